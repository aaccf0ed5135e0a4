"""The one shell parser: table keys, the store's main_program and the features agree, case by case."""

from __future__ import annotations

import pytest

from ctk.datasets.shell import (
    PARSE_CHARS,
    PROGRAM_KEY,
    QUICK_KEY,
    command_keys,
    parse_command,
    split_command,
)


def chain(command: str, tool: str | None = None) -> list[str]:
    """The key chain without its kind level (tested on its own below)."""
    return [k for k in command_keys(command, tool) if k not in (QUICK_KEY, PROGRAM_KEY)]

CASES = [
    # pipes: the first program that is not a quick utility does the work
    ("echo hi | python3 sol.py", ["python:script", "python", "*"]),
    ("printf '5\\n3' | ./solve", ["solve", "*"]),
    ("cat data.txt | grep -c x | sort", ["cat", "*"]),
    ("cmd 2>&1 | tail -5", ["cmd", "*"]),
    # && / ; / || chains and cd prefixes
    ("cd /r && ls && git status", ["git:status", "git", "*"]),
    ("cd /testbed; python -m pytest -q tests/", ["python:pytest", "python", "*"]),
    ("ls -la x 2>/dev/null || echo gone && ls /etc \n2>/dev/null", ["ls", "*"]),
    ("export X=1; cd a; ls -la | head", ["ls", "*"]),
    ("cd /app && . venv/bin/activate && pip install x", ["pip:install", "pip", "*"]),
    ("cd /app", ["cd", "*"]),
    # segments: separators inside quotes do not split, ``>&`` is a redirection, ``>&&`` ends one
    ('echo "a && b" && make test', ["make:test", "make", "*"]),
    ("echo 'x | y; z' ; python3 run.py", ["python:script", "python", "*"]),
    ("make 2>&1 >&2 && pytest -q", ["make", "*"]),
    ("cmd >&& python x.py", ["cmd", "*"]),
    ('ls "dir" && "python3" run.py', ["python:script", "python", "*"]),
    ('echo "unterminated && python run.py', ["echo", "*"]),
    # wrappers: timeout / nohup / env / sudo, with their options and values
    ("timeout 30 python train.py", ["python:script", "python", "*"]),
    ("timeout -s KILL 10m nohup env A=1 sudo -u app python -m pytest -q", ["python:pytest", "python", "*"]),
    ("sudo apt-get install -y curl", ["apt-get:install", "apt-get", "*"]),
    ("FOO=1 BAR='a b' pytest tests/", ["pytest", "*"]),
    ('IP="45.32.67.89"\nx=$(grep "$IP" auth.log 2>/dev/null || true)', ["grep", "*"]),
    ('bash -lc "cd /x && make test"', ["make:test", "make", "*"]),
    ("bash run_all.sh", ["bash:script", "bash", "*"]),
    # heredocs: the body is data, the delimiter is not a program
    ("cat <<'EOF' > t.sh\nfoo\nbar\nEOF", ["cat:write", "cat", "*"]),
    ("cat <<'EOF' > t.sh\nfoo\nEOF\nbash t.sh", ["bash:script", "bash", "*"]),
    ("python3 - <<EOF\nimport x\nEOF", ["python:stdin", "python", "*"]),
    ("python3 < in.txt", ["python:stdin", "python", "*"]),
    ("cat <<'EOF' > a.sh\n./game.sh 1 << 'EOF'\nmove\nEOF\nEOF", ["cat:write", "cat", "*"]),
    # quoted regular expressions and flags are arguments, never keys
    ("grep -rE 'sk-[a-z]{20}|hf_[a-z0-9]{34}|ghp_[A-Za-z0-9]{36}' --include='*.py' .", ["grep", "*"]),
    ("grep -rn \"def main\" --include=*.py src | head", ["grep", "*"]),
    ("\n--include=*.py foo", ["*"]),
    ("echo $((10**9+7))", ["echo", "*"]),
    ('echo "Lines:" && grep -n "invalid user" /app/logs/auth.log \n/app/logs/http.log', ["echo", "*"]),
    # shell keywords
    ('for f in data/*; do\n if [ -f "$f" ]; then\n b=$(basename "$f")\n rencrypt -p rev "$f"\n fi\ndone',
     ["rencrypt", "*"]),
    ("if [ -f model.bin ]; then fasttext test model.bin t.txt; fi", ["fasttext", "*"]),
    ("while true; do curl -s localhost:8080; sleep 1; done", ["curl", "*"]),
    # a sub-command is a verb, never a file, number or service name
    ("git clone https://x/y.git", ["git:clone", "git", "*"]),
    ("git -C /repo status --short", ["git:status", "git", "*"]),
    ("make", ["make", "*"]),
    ("service nginx start", ["service", "*"]),
    ("docker exec -it c1 ls", ["docker:exec", "docker", "*"]),
    ("python -m http.server 8000", ["python:http", "python", "*"]),
    ("python -c 'print(1)'", ["python:-c", "python", "*"]),
    ("/usr/bin/python3.11 x.py", ["python:script", "python", "*"]),
    ("", ["*"]),
]


@pytest.mark.parametrize(("command", "keys"), CASES, ids=[c[:40] for c, _ in CASES])
def test_command_keys(command: str, keys: list[str]) -> None:
    assert chain(command) == keys


@pytest.mark.parametrize(("command", "keys"), CASES, ids=[c[:40] for c, _ in CASES])
def test_store_main_program_is_the_key_program(command: str, keys: list[str]) -> None:
    """``split_command`` (the store's main_program, ``ctk stats``) names the program the keys name."""
    tool, main = split_command(command)
    if not command.strip():
        assert (tool, main) == (None, None)
        return
    assert tool == command.strip().split(None, 1)[0]
    prog = parse_command(command)[0]
    if prog is not None:
        assert main == prog
        assert keys[-2] == prog


def test_keys_never_hold_an_argument() -> None:
    """No key of a quoted regex, flag, number or path ever appears (the back-off then reaches a real key)."""
    commands = [
        "grep -E 'a|b|--include=|[0-9]{3}' f",
        "rg --type py 'x|y'",
        "find . -name '*.py' -exec wc -l {} +",
        "echo 'a && b; c | d'",
    ]
    for c in commands:
        for k in chain(c)[:-1]:
            prog = k.split(":")[0]
            assert prog.isidentifier() or prog.replace("-", "_").replace(".", "_").isidentifier(), (c, k)
            assert "|" not in k and "=" not in k and "{" not in k and not k.startswith("-"), (c, k)


def test_tool_name_levels() -> None:
    assert command_keys('{"path": "a.py"}', "str_replace_editor") == ["str_replace_editor", "*"]
    assert command_keys("ls", "functions.shell") == ["ls", QUICK_KEY, "*"]
    assert command_keys("x.py args", "python_script") == ["x.py", "python_script", PROGRAM_KEY, "*"]
    assert command_keys(None, "apply_patch") == ["apply_patch", "*"]


@pytest.mark.parametrize(
    ("command", "kind"),
    [
        ("ls -la", QUICK_KEY),
        ("cd /r && grep -rn x .", QUICK_KEY),
        ("od -c f | head", QUICK_KEY),
        ("cd /app", QUICK_KEY),
        ("pdp11 -e run", PROGRAM_KEY),
        ("cd /r && python -m pytest", PROGRAM_KEY),
        ("./maze_game.sh 1", PROGRAM_KEY),
    ],
)
def test_a_command_backs_off_to_its_kind_before_everything(command: str, kind: str) -> None:
    """A program never seen backs off to its kind (quick utility or other program), then to ``*``."""
    keys = command_keys(command)
    assert keys[-2:] == [kind, "*"] and keys.count(QUICK_KEY) + keys.count(PROGRAM_KEY) == 1


def test_long_command_is_cached_and_bounded() -> None:
    long = "cd /r && " + "echo x && " * 5000 + "python train.py"
    assert command_keys(long)[-1] == "*"
    assert command_keys(long) == command_keys(long)


def test_a_line_continuation_segment_holds_no_program(shared_traces) -> None:
    """A segment made only of a line continuation (``cmd && \\`` then a newline) is skipped without
    tokenizing: over the real commands, continuing each ``&&`` on the next line keeps every key."""
    import csv

    with (shared_traces / "tool_calls.csv").open() as fh:
        rows = [r["command_or_args"] for r in csv.DictReader(fh) if " && " in r["command_or_args"]]
    # within the parsed head and segment budget either way (longer texts are cut where they differ)
    commands = [c for c in rows if len(c) + 2 * c.count("&&") <= PARSE_CHARS and c.count("&&") < 5]
    assert len(commands) > 100
    for c in commands:
        assert command_keys(c.replace(" && ", " && \\\n")) == command_keys(c), c
