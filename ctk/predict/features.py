"""Command parsing and features of a tool call.

:func:`command_keys` is the serve-time half: pure Python, no third-party imports, called by the scheduler for
every finished request, and used identically when training the TTL tables. It parses the command text only
(serving does not know the store's ``tool_name`` / ``main_program`` columns).

:class:`FeatureSpec` names the learned predictor's features; they are computed, vectorized, by
:mod:`ctk.predict.dataset` (pandas), which the serve path never imports.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

#: Only the head of a command is parsed: heredoc bodies and long scripts carry no more key information.
PARSE_CHARS = 256
#: At most this many ``&&`` / ``|`` / ``;`` segments are examined for the main program.
MAX_SEGMENTS = 6

# words first (the common case), possessive quantifiers (no backtracking)
_DQ = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?'  # double-quoted string, unrolled (no per-char alternation)
_TOKEN_RE = re.compile(r"""[^\s;|&<>()'"]++|&&|\|\||[;|&\n()]|'[^']*+'?|""" + _DQ + r"|<<-?|>>|[<>]")
_SEPARATORS = {"&&", "||", ";", "|", "&", "\n", "(", ")"}
_SEP_RE = re.compile(r"&&|\|\||[;|&\n()]")
_QUOTE_RE = re.compile(r"'[^']*+'?|" + _DQ)
_REDIRECTS = {"<", ">", ">>", "<<", "<<-"}
_ASSIGN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_VERSION_SUFFIX_RE = re.compile(r"^(python|pip|pytest|node|ruby|perl|php|gcc|g\+\+|clang|java)[0-9.]*$")
_LABEL_RE = re.compile(r"^\[([A-Za-z][A-Za-z0-9_.-]*?)(?:_[0-9_]+)?\]$")

#: Segments that only set up the shell; the main program is the first segment after them.
_SETUP = {
    "cd",
    "pushd",
    "popd",
    "export",
    "set",
    "source",
    ".",
    "unset",
    "alias",
    "true",
    "shopt",
    "umask",
    "ulimit",
    "clear",
}
#: Wrappers whose argument is the real command (``timeout 60 pip install x`` -> ``pip install``).
_WRAPPERS = {
    "sudo",
    "env",
    "nohup",
    "time",
    "nice",
    "ionice",
    "stdbuf",
    "xvfb-run",
    "exec",
    "command",
    "builtin",
    "caffeinate",
    "chronic",
    "unbuffer",
    "timeout",
    "gtimeout",
}
#: Shells whose ``-c`` string is parsed recursively.
_SHELLS = {"bash", "sh", "zsh", "dash", "ksh"}
#: Programs keyed by their first non-option argument (``git status`` vs ``git clone``).
_SUBCOMMAND_PROGRAMS = {
    "git",
    "pip",
    "pipx",
    "uv",
    "poetry",
    "conda",
    "mamba",
    "micromamba",
    "npm",
    "npx",
    "yarn",
    "pnpm",
    "bun",
    "cargo",
    "go",
    "make",
    "cmake",
    "apt",
    "apt-get",
    "yum",
    "dnf",
    "apk",
    "brew",
    "docker",
    "podman",
    "kubectl",
    "helm",
    "gem",
    "bundle",
    "mvn",
    "gradle",
    "dotnet",
    "systemctl",
    "service",
    "tmux",
    "rustup",
    "terraform",
    "aws",
    "gcloud",
    "az",
    "hf",
    "huggingface-cli",
    "ollama",
    "rails",
    "django-admin",
    "flask",
    "deno",
    "nix",
    "tox",
    "nox",
    "supervisorctl",
    "redis-cli",
    "psql",
    "mysql",
    "sqlite3",
    "ffmpeg",
}
#: Writers: with an output redirection they write a file (``cat <<EOF > f``) and are always fast.
_WRITERS = {"cat", "echo", "printf", "tee"}
#: Quick programs: when a command chains several programs, the first one NOT in this set is the main one
#: (``printf 5 | python3 sol.py`` -> ``python``); a command of only quick programs keys by its first.
_QUICK = _WRITERS | {
    "ls",
    "pwd",
    "head",
    "tail",
    "grep",
    "egrep",
    "rg",
    "wc",
    "sort",
    "uniq",
    "tr",
    "cut",
    "sed",
    "awk",
    "mkdir",
    "rm",
    "cp",
    "mv",
    "touch",
    "chmod",
    "chown",
    "which",
    "type",
    "stat",
    "file",
    "du",
    "df",
    "basename",
    "dirname",
    "realpath",
    "readlink",
    "ln",
    "nl",
    "od",
    "xxd",
    "diff",
    "tree",
    "date",
    "whoami",
    "id",
    "uname",
    "test",
    "[",
    "[[",
    "xargs",
    "column",
    "less",
    "more",
    "jq",
    "printenv",
    "hostname",
    "ps",
    "kill",
    "true",
    "false",
    ":",
}
_PROG_START_RE = re.compile(r"^[a-z0-9_.+\[-]")
_FD_REDIRECT_RE = re.compile(r"^[0-9]*>&?[0-9]*$")
_HEREDOC_RE = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
_SHELL_TOOL_NAMES = {
    "bash",
    "sh",
    "shell",
    "terminal",
    "exec",
    "execute",
    "execute_bash",
    "run",
    "run_command",
    "cmd",
    "command",
    "local",
    "sandbox",
}
_MAX_SUB_LEN = 40


def _unquote(tok: str) -> str:
    if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "'\"":
        return tok[1:-1]
    if tok[:1] in "'\"":
        return tok[1:]
    return tok


@lru_cache(maxsize=16384)
def _normalize_program(word: str) -> str:
    word = _unquote(word).strip()
    word = word.split(None, 1)[0] if word else word
    label = _LABEL_RE.match(word)
    if label:  # "[train_code_improve_1_7_1]": a labelled generated script
        return label.group(1).lower()
    word = word.rstrip("/").rsplit("/", 1)[-1].lower() if "/" in word else word.lower()
    m = _VERSION_SUFFIX_RE.match(word)
    if m:
        return m.group(1)
    return word


def _strip_heredocs(text: str) -> str:
    """Remove heredoc bodies (``cat <<'EOF' > f ... EOF``): their lines are data, not commands."""
    pos = 0
    while True:
        m = _HEREDOC_RE.search(text, pos)
        if not m:
            return text
        nl = text.find("\n", m.end())
        if nl < 0:
            return text
        delim = m.group(2)
        end = -1
        at = nl
        while True:  # the delimiter alone on a line (leading tabs allowed for <<-)
            at = text.find(delim, at + 1)
            if at < 0:
                break
            line_start = text.rfind("\n", 0, at) + 1
            line_end = text.find("\n", at)
            line_end = len(text) if line_end < 0 else line_end
            if text[line_start:line_end].strip() == delim:
                end = line_end
                break
        text = text[: nl + 1] + (text[end:] if end >= 0 else "")
        pos = nl + 1


def _head(text: str) -> str:
    """The part of a command that is parsed: heredoc bodies removed, then cut to :data:`PARSE_CHARS`."""
    if "<<" in text:
        text = _strip_heredocs(text[: 4 * PARSE_CHARS])
    return text[:PARSE_CHARS]


def _tokens(text: str) -> list[str]:
    return _TOKEN_RE.findall(_head(text))


def _segments(tokens: list[str]) -> list[list[str]]:
    segs: list[list[str]] = [[]]
    for tok in tokens:
        if tok in _SEPARATORS:
            if segs[-1]:
                segs.append([])
        else:
            segs[-1].append(tok)
    return [s for s in segs if s]


def _mask(m: re.Match) -> str:
    return "_" * (m.end() - m.start())


def _segment_spans(head: str) -> Iterator[tuple[str, str]]:
    """``(masked, original)`` text of each ``&&`` / ``|`` / ``;`` segment; quoted strings masked with ``_``
    (so separators inside quotes do not split), all in C-speed regex passes."""
    masked = _QUOTE_RE.sub(_mask, head) if ("'" in head or '"' in head) else head
    start = 0
    for m in _SEP_RE.finditer(masked):
        if m.start() > start:
            yield masked[start : m.start()], head[start : m.start()]
        start = m.end()
    if start < len(head):
        yield masked[start:], head[start:]


def _iter_segments(text: str) -> Iterator[list[str]]:
    """Segments of a command (the caller stops at the first segment that decides)."""
    seg: list[str] = []
    for tok in _TOKEN_RE.findall(_head(text)):
        if tok in _SEPARATORS:
            if seg:
                yield seg
                seg = []
        else:
            seg.append(tok)
    if seg:
        yield seg


def _strip_wrappers(seg: list[str]) -> list[str]:
    """Drop ``VAR=x``, ``sudo``, ``timeout 30`` ... so ``seg[0]`` is the real program."""
    i = 0
    while i < len(seg):
        tok = seg[i]
        if "=" in tok and _ASSIGN_RE.match(_unquote(tok)):
            i += 1
            continue
        name = _normalize_program(tok)
        if name in _WRAPPERS:
            i += 1
            # skip the wrapper's options and (timeout) its duration argument
            while i < len(seg) and (seg[i].startswith("-") or _ASSIGN_RE.match(seg[i])):
                i += 1
            if name in ("timeout", "gtimeout") and i < len(seg) and re.match(r"^[0-9.]+[smhd]?$", seg[i]):
                i += 1
            continue
        break
    return seg[i:]


def _program_words(seg: list[str]) -> list[str]:
    """The program's words (redirections and their targets removed)."""
    out: list[str] = []
    skip = False
    for tok in seg:
        if skip:
            skip = False
            continue
        if tok in _REDIRECTS:
            skip = True
            continue
        if _FD_REDIRECT_RE.match(tok):
            continue
        out.append(tok)
    return out


def _subcommand(prog: str, words: list[str], seg: list[str]) -> str | None:
    args = [_unquote(w) for w in words[1:]]
    if prog == "python":
        for j, a in enumerate(args):
            if a == "-m" and j + 1 < len(args):
                return args[j + 1].split(".")[0].lower()
            if a == "-c":
                return "-c"
            if a == "-":
                return "stdin"
            if a.startswith("-"):
                continue
            return "script"
        return "stdin" if "<<" in seg or "<" in seg or "<<-" in seg else None
    if prog in _WRITERS:
        if ">" in seg or ">>" in seg or prog == "tee":
            return "write"
        return None
    if prog in _SUBCOMMAND_PROGRAMS:
        for a in args:
            if a.startswith("-") or _ASSIGN_RE.match(a):
                continue
            a = a.lower()
            return a if 0 < len(a) <= _MAX_SUB_LEN and re.match(r"^[a-z0-9][a-z0-9_.:-]*$", a) else None
    return None


def parse_command(command: str) -> tuple[str | None, str | None]:
    """``(main program, sub-command)`` of a shell command, e.g. ``("python", "pytest")``; ``(None, None)``.

    The main program is the first one after shell set-up (``cd``, ``export``, ``VAR=``, ``source``) and
    wrappers (``sudo``, ``timeout 60``, ``bash -c``) that is not a quick utility (``echo``, ``ls``, ``grep``);
    a command made only of quick utilities keys by its first one.
    """
    return _parse_cached(command[: 4 * PARSE_CHARS])


@lru_cache(maxsize=8192)
def _parse_cached(head: str) -> tuple[str | None, str | None]:
    first: tuple[str | None, str | None] = (None, None)
    quick: tuple[str | None, str | None] = (None, None)
    for n_seg, (masked, text) in enumerate(_segment_spans(_head(head))):
        if n_seg >= MAX_SEGMENTS:  # a long chain of quick utilities: decided by what was seen
            break
        # fast path: a plain first word that is set-up or a further quick utility needs no tokenizing
        w = masked.split(None, 1)
        if not w:
            continue
        w0 = w[0]
        if w0[0] not in "_'\"" and "=" not in w0 and "<" not in w0 and ">" not in w0:
            p0 = _normalize_program(w0)
            if p0 in _SETUP:
                if first[0] is None:
                    first = (p0, None)
                continue
            if p0 in _QUICK and quick[0] is not None:
                continue
        seg = _strip_wrappers(_TOKEN_RE.findall(text))
        word0 = _first_word(seg)
        if word0 is None:
            continue
        prog = _normalize_program(word0)
        if not prog or not _PROG_START_RE.match(prog):
            continue
        if prog in _SETUP:
            if first[0] is None:
                first = (prog, None)
            continue
        if prog in _QUICK:
            if quick[0] is None:
                quick = (prog, _subcommand(prog, _program_words(seg), seg))
            continue
        words = _program_words(seg)
        if prog in _SHELLS:
            for j, w in enumerate(words[1:], start=1):
                if w.startswith("-") and "c" in w and j + 1 < len(words):
                    inner = _parse_cached(_unquote(words[j + 1])[: 4 * PARSE_CHARS])
                    if inner[0] in _QUICK and quick[0] is None:
                        quick = inner
                        break
                    if inner[0] is not None and inner[0] not in _QUICK:
                        return inner
                    break
            else:
                if len(words) > 1 and not words[1].startswith("-"):
                    return prog, "script"
            continue
        return prog, _subcommand(prog, words, seg)
    return quick if quick[0] is not None else first


def _first_word(seg: list[str]) -> str | None:
    skip = False
    for tok in seg:
        if skip:
            skip = False
        elif tok in _REDIRECTS:
            skip = True
        elif not _FD_REDIRECT_RE.match(tok):
            return tok
    return None


def _looks_like_args(command: str) -> bool:
    s = command.lstrip()
    return s[:1] in "{[" and not _LABEL_RE.match(s.split(None, 1)[0] if s.split() else "")


def command_keys(command: str | None, tool_name: str | None = None) -> list[str]:
    """The back-off chain of table keys for one tool call, most specific first, always ending with ``"*"``.

    ``"cd /r && python -m pytest -k x"`` -> ``["python:pytest", "python", "*"]``. A function-calling tool
    (``tool_name`` given, ``command`` its JSON arguments) keys by the tool name. A tool name that is neither a
    shell tool nor the parsed program adds one more back-off level after the program.
    """
    keys: list[str] = []
    tool = _normalize_program(tool_name) if tool_name else None
    if tool and tool.startswith("functions."):
        tool = tool[len("functions.") :]
    prog = sub = None
    if command and _looks_like_args(command):
        return [tool, "*"] if tool else ["*"]
    if command and command.strip():
        prog, sub = parse_command(command)
    if prog:
        if sub:
            keys.append(f"{prog}:{sub}")
        keys.append(prog)
    if (
        tool
        and tool not in _SHELL_TOOL_NAMES
        and tool not in _SETUP
        and tool not in _WRAPPERS
        and tool not in keys
        and (not command or not command.lstrip().lower().startswith(tool))
    ):
        keys.append(tool)
    keys.append("*")
    return keys


# -- features for the learned predictor ---------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSpec:
    """Feature columns of the learned predictor (computed by :mod:`ctk.predict.dataset`)."""

    categorical: tuple[str, ...] = ("key0", "key1", "source")
    numeric: tuple[str, ...] = (
        "n_chars",
        "n_lines",
        "n_args",
        "n_segments",
        "n_pipes",
        "n_redirects",
        "has_heredoc",
        "has_timeout",
        "timeout_s",
        "n_paths",
        "ext_py",
        "ext_sh",
        "ext_data",
        "has_heavy",
        "has_network",
        "is_write",
        "is_background",
        "turn_index",
        "context_est",
        "llm_output_chars",
        "prev_duration_log",
        "prev_mean_log",
        "prev_max_log",
        "prev_same_key_log",
        "n_prev",
    )

    @property
    def names(self) -> tuple[str, ...]:
        return self.categorical + self.numeric

    def to_dict(self) -> dict:
        return {"categorical": list(self.categorical), "numeric": list(self.numeric)}

    @classmethod
    def from_dict(cls, d: dict) -> FeatureSpec:
        return cls(categorical=tuple(d["categorical"]), numeric=tuple(d["numeric"]))
