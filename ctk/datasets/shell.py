"""The one shell-command parser: the store's ``main_program``, ``ctk stats``, the predictors' table keys.

:func:`parse_command` finds the program that does the work and at most one sub-command:
``cd /r && timeout 60 python -m pytest -k x`` -> ``("python", "pytest")``. The main program is the first one
after shell set-up (``cd``, ``export``, ``VAR=x``, ``source``), wrappers (``sudo``, ``env``, ``nohup``,
``timeout 60``, ``bash -c '...'``) and shell keywords (``if``, ``then``, ``do``) that is not a quick utility
(``echo``, ``ls``, ``grep``); a command made only of quick utilities keys by its first one. A sub-command is
a known verb (``git status``, ``pip install``, ``python -m pytest``), never an argument: regular expressions,
flags, file names and numbers are not programs nor sub-commands.

:func:`command_keys` turns that into the back-off chain of table keys (``["python:pytest", "python", "*"]``);
:func:`split_command` gives the store's ``(tool_name, main_program)``. Pure Python, cached, no third-party
imports: the engine's scheduler calls :func:`command_keys` for every finished request.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from functools import lru_cache

#: Only the head of a command is parsed: heredoc bodies and long scripts carry no more key information.
PARSE_CHARS = 256
#: At most this many ``&&`` / ``|`` / ``;`` segments are examined for the main program.
MAX_SEGMENTS = 12

_DQ = r'"[^"\\]*+(?:\\.[^"\\]*+)*+"?'  # double-quoted string, unrolled (no per-char alternation)
_SQ = r"'[^']*+'?"
#: A redirection, with its file descriptor and a ``&1`` / ``&-`` target when written in one piece.
_REDIR = r"[0-9]*+(?:<<-?|>>|<|>)(?:&[0-9-]*+)?"
#: A word glues adjacent quoted and unquoted parts (``X="a b"`` is one word, as in the shell).
_WORD = r"(?:[^\s;|&<>()'\"]++|" + _SQ + "|" + _DQ + r")++"
_TOKEN_RE = re.compile(_REDIR + r"|&&|\|\||[;|&\n()]|" + _WORD)
_REDIR_RE = re.compile(_REDIR)
_SEPARATORS = {"&&", "||", ";", "|", "&", "\n", "(", ")"}
#: A segment between separators (``&&``, ``||``, ``;``, ``|``, ``&``, newline, parentheses): quoted strings
#: whole, and an ``&`` only as a redirection's ``>&`` / ``<&`` (not followed by another ``&``).
_SEGMENT_RE = re.compile(r"(?:[^'\"&|;\n()]++|" + _SQ + "|" + _DQ + r"|(?<=[<>])&(?!&))++")
_QUOTE_RE = re.compile(_SQ + "|" + _DQ)
_ASSIGN_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\+?=")
_VERSION_SUFFIX_RE = re.compile(r"^(python|pip|pytest|node|ruby|perl|php|gcc|g\+\+|clang|java)[0-9.]*$")
_LABEL_RE = re.compile(r"^\[([A-Za-z][A-Za-z0-9_.-]*?)(?:_[0-9_]+)?\]$")
#: What a program name looks like once its path is dropped (no ``=``, ``$``, ``*``, ``:``, quotes).
_PROGRAM_RE = re.compile(r"^(?:\[\[?|[a-z0-9_][a-z0-9_.+-]*)$")
#: Names ending like data files are arguments that a wrapped or truncated line left at a line start.
_DATA_EXT_RE = re.compile(
    r"\.(?:log|txt|html?|json|jsonl|csv|tsv|md|xml|ya?ml|toml|ini|conf|cfg|out|err|gz|zip|tar|pkl|npy|png|jpe?g)$"
)
#: The characters a program name can start with (the first of ``_PROGRAM_RE``).
_PROGRAM_START = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_[")
_LETTER_RE = re.compile(r"[a-z]")  # a program name is lower-case ASCII (_PROGRAM_RE)
_SUB_RE = re.compile(r"^[a-z][a-z0-9_-]*$")
_MAX_SUB_LEN = 24


def _names(text: str) -> frozenset[str]:
    return frozenset(text.split())


#: Segments that only set up the shell; the main program is the first segment after them.
_SETUP = _names(
    "cd pushd popd export set source . unset alias true shopt umask ulimit clear local declare trap wait"
)
#: Wrappers whose argument is the real command (``timeout 60 pip install x`` -> ``pip install``).
_WRAPPERS = _names(
    "sudo env nohup time nice ionice stdbuf xvfb-run exec command builtin caffeinate chronic unbuffer "
    "timeout gtimeout"
)
#: Wrapper options that take a value (``sudo -u app python x`` -> ``python``).
_WRAPPER_OPTION_ARGS = {
    "sudo": _names("-u -g -C -D -h -p -r -t -U"),
    "env": _names("-u -C -S"),
    "nice": frozenset(["-n"]),
    "ionice": _names("-c -n -p"),
    "timeout": _names("-s -k"),
    "gtimeout": _names("-s -k"),
    "stdbuf": _names("-i -o -e"),
}
#: Shell keywords followed by a command (``if grep -q x f; then make; fi``): dropped like a wrapper.
_KEYWORD_PREFIXES = _names("if elif while until then do else ! { time")
#: Shell keywords that start or end a segment holding no program (``for x in a b``, ``done``).
_KEYWORD_SEGMENTS = _names("for case select function fi done esac } in")
#: Shells whose ``-c`` string is parsed recursively.
_SHELLS = _names("bash sh zsh dash ksh")
#: Programs keyed by their first non-option argument when it is a verb (``git status`` vs ``git clone``).
_SUBCOMMAND_PROGRAMS = _names(
    "git pip pipx uv poetry conda mamba micromamba npm npx yarn pnpm bun cargo go make cmake apt apt-get "
    "yum dnf apk brew docker podman kubectl helm gem bundle mvn gradle dotnet systemctl tmux rustup "
    "terraform aws "
    "gcloud az hf huggingface-cli ollama rails django-admin flask deno nix tox nox supervisorctl"
)
#: Their options that take a value before the verb (``git -C /r status``).
_PROGRAM_OPTION_ARGS = {
    "git": _names("-C -c"),
    "make": _names("-C -f -j -l"),
    "docker": _names("-H -c --context --host"),
    "kubectl": _names("-n --namespace --context"),
    "npm": frozenset(["--prefix"]),
    "helm": _names("-n --namespace"),
}
#: Writers: with an output redirection they write a file (``cat <<EOF > f``) and are always fast.
_WRITERS = _names("cat echo printf tee")
#: Quick programs: when a command chains several programs, the first one NOT in this set is the main one
#: (``printf 5 | python3 sol.py`` -> ``python``); a command of only quick programs keys by its first.
_QUICK = _WRITERS | _names(
    "ls pwd head tail grep egrep fgrep rg wc sort uniq tr cut sed awk mkdir rm cp mv touch chmod chown "
    "which type stat file du df basename dirname realpath readlink ln nl od xxd diff tree date whoami id "
    "uname test "
    "[ [[ xargs column less more jq printenv hostname ps kill true false : sleep"
)
_HEREDOC_RE = re.compile(r"<<-?\s*(['\"]?)([A-Za-z_][A-Za-z0-9_]*)\1")
#: Tool names of a generic shell tool (the command, not the tool name, says what runs).
SHELL_TOOL_NAMES = _names(
    "bash sh shell terminal exec execute execute_bash run run_command cmd command local sandbox"
)


#: Back-off levels between a program and ``*``: the quick utilities (``ls``, ``od``, ``cat``) pooled, and
#: the other programs pooled, so a program never seen backs off to its kind, not to all calls.
QUICK_KEY = "(quick)"
PROGRAM_KEY = "(program)"


def _unquote(tok: str) -> str:
    if len(tok) >= 2 and tok[0] == tok[-1] and tok[0] in "'\"":
        return tok[1:-1]
    if tok[:1] in "'\"":
        return tok[1:]
    return tok


@lru_cache(maxsize=16384)
def normalize_program(word: str) -> str:
    """``/usr/bin/python3.11`` -> ``python``; ``[train_code_1_2]`` (a labelled script) -> its label."""
    word = _unquote(word).strip()
    word = word.split(None, 1)[0] if word else word
    label = _LABEL_RE.match(word)
    if label:
        return label.group(1).lower()
    word = word.rstrip("/").rsplit("/", 1)[-1].lower() if "/" in word else word.lower()
    m = _VERSION_SUFFIX_RE.match(word)
    return m.group(1) if m else word


def _is_program(raw: str, prog: str) -> bool:
    """A program name, not an argument a wrapped line left at a line start (``2``, ``EOF``, ``auth.log``)."""
    if not prog or not _PROGRAM_RE.match(prog) or _DATA_EXT_RE.search(prog):
        return False
    if prog[0] != "[" and not _LETTER_RE.search(prog):  # "2", "10**9", "45.32.67.89"
        return False
    base = _unquote(raw).rsplit("/", 1)[-1]
    return not (len(base) > 1 and base.isupper())  # heredoc delimiters: EOF, END, PYEOF


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


def _mask(m: re.Match) -> str:
    return "_" * (m.end() - m.start())


def _segment_spans(head: str) -> Iterator[tuple[str, str]]:
    """``(first word, text)`` of each ``&&`` / ``|`` / ``;`` segment, in one C-speed regex pass: quoted
    strings are consumed whole, so separators inside quotes do not split. The first word has its quoted
    strings masked by ``_`` (masked only when it holds a quote); ``""`` for a blank segment."""
    for m in _SEGMENT_RE.finditer(head):
        text = m.group()
        w = text.split(None, 1)
        if not w:
            yield "", text
            continue
        w0 = w[0]
        if "'" in w0 or '"' in w0:
            w0 = _QUOTE_RE.sub(_mask, text).split(None, 1)[0]
        yield w0, text


def _is_redirect(tok: str) -> bool:
    return tok[:1] in "<>0123456789" and _REDIR_RE.fullmatch(tok) is not None


def _takes_target(tok: str) -> bool:
    """``>`` / ``2>>`` / ``<<`` are followed by their file (or delimiter); ``2>&1`` is complete."""
    return "&" not in tok


def _program_words(seg: list[str], text: str) -> list[str]:
    """The segment's words without redirections and their targets (``text``: the segment's text; a
    redirection holds ``<`` or ``>``, so without either the words are the tokens)."""
    if "<" not in text and ">" not in text:
        return seg
    out: list[str] = []
    skip = False
    for tok in seg:
        if skip:
            skip = False
        elif _is_redirect(tok):
            skip = _takes_target(tok)
        else:
            out.append(tok)
    return out


def _strip_wrappers(words: list[str]) -> list[str]:
    """Drop ``VAR=x``, ``sudo``, ``timeout 30``, ``then`` ... so ``words[0]`` is the real program."""
    i = 0
    while i < len(words):
        tok = words[i]
        if "=" in tok and _ASSIGN_RE.match(_unquote(tok)):
            i += 1
            continue
        name = normalize_program(tok)
        if name in _KEYWORD_PREFIXES:
            i += 1
            continue
        if name in _WRAPPERS:
            i += 1
            # skip the wrapper's options (and their values) and (timeout) its duration argument
            with_value = _WRAPPER_OPTION_ARGS.get(name, frozenset())
            while i < len(words) and (words[i].startswith("-") or _ASSIGN_RE.match(words[i])):
                i += 2 if words[i] in with_value else 1
            if name in ("timeout", "gtimeout") and i < len(words) and re.match(r"^[0-9.]+[smhd]?$", words[i]):
                i += 1
            continue
        break
    return words[i:]


def _subcommand(prog: str, words: list[str], seg: list[str]) -> str | None:
    if prog != "python" and prog not in _SUBCOMMAND_PROGRAMS and prog not in _WRITERS:
        return None
    args = [_unquote(w) for w in words[1:]]
    if prog == "python":
        for j, a in enumerate(args):
            if a == "-m" and j + 1 < len(args):
                mod = args[j + 1].split(".")[0].lower()
                return mod if _SUB_RE.match(mod) and len(mod) <= _MAX_SUB_LEN else "module"
            if a == "-c":
                return "-c"
            if a == "-":
                return "stdin"
            if a.startswith("-"):
                continue
            return "script"
        return "stdin" if any(t[:1] in "<0123456789" and "<" in t for t in seg if _is_redirect(t)) else None
    if prog in _WRITERS:
        if prog == "tee" or any(">" in t for t in seg if _is_redirect(t)):
            return "write"
        return None
    if prog in _SUBCOMMAND_PROGRAMS:
        with_value = _PROGRAM_OPTION_ARGS.get(prog, frozenset())
        skip = False
        for a in args:
            if skip or a.startswith("-") or _ASSIGN_RE.match(a):
                skip = a in with_value
                continue
            a = a.lower()
            return a if len(a) <= _MAX_SUB_LEN and _SUB_RE.match(a) else None
    return None


def parse_command(command: str) -> tuple[str | None, str | None]:
    """``(main program, sub-command)`` of a shell command, e.g. ``("python", "pytest")``; ``(None, None)``
    when no program is found; ``("cd", None)`` for a command of set-up only."""
    return _parse_cached(command[: 4 * PARSE_CHARS])


@lru_cache(maxsize=8192)
def _parse_cached(head: str) -> tuple[str | None, str | None]:
    first: tuple[str | None, str | None] = (None, None)
    quick: tuple[str | None, str | None] = (None, None)
    for n_seg, (w0, text) in enumerate(_segment_spans(_head(head))):
        if n_seg >= MAX_SEGMENTS:  # a long chain of quick utilities: decided by what was seen
            break
        # fast path: a plain first word that is set-up, a shell keyword alone or before no program (``done``,
        # ``for x in y``, ``then``) or a further quick utility needs no tokenizing; the tokenizing path below
        # finds the same (the plain first word is its first token, neither a redirection nor a wrapper)
        if not w0:
            continue
        if w0[0] not in "_'\"" and "=" not in w0 and "<" not in w0 and ">" not in w0:
            p0 = normalize_program(w0)
            if p0 in _KEYWORD_SEGMENTS or (p0 in _KEYWORD_PREFIXES and text.strip() == w0):
                continue
            if p0 in _SETUP:
                if first[0] is None:
                    first = (p0, None)
                continue
            if p0 in _QUICK and quick[0] is not None:
                continue
            # not a wrapper nor a keyword: the plain first word is the program the tokenizing path would
            # judge, and one that cannot start a program name (a line continuation ``\``) is none
            if p0[:1] not in _PROGRAM_START and p0 not in _KEYWORD_PREFIXES:
                continue
        seg = _TOKEN_RE.findall(text)
        words = _strip_wrappers(_program_words(seg, text))
        if not words:
            continue
        prog = normalize_program(words[0])
        if prog in _KEYWORD_SEGMENTS or not _is_program(words[0], prog):
            continue
        if prog in _SETUP:
            if first[0] is None:
                first = (prog, None)
            continue
        if prog in _QUICK:
            if quick[0] is None:
                quick = (prog, _subcommand(prog, words, seg))
            continue
        if prog in _SHELLS:
            inner = _shell_inner(words)
            if inner is None:
                if len(words) > 1 and not words[1].startswith("-"):
                    return prog, "script"
                continue
            if inner[0] in _QUICK:
                if quick[0] is None:
                    quick = inner
                continue
            if inner[0] is not None:
                return inner
            continue
        return prog, _subcommand(prog, words, seg)
    return quick if quick[0] is not None else first


def _shell_inner(words: list[str]) -> tuple[str | None, str | None] | None:
    """The parse of ``bash -lc '...'``'s string; None when the shell runs no ``-c`` string."""
    for j, w in enumerate(words[1:], start=1):
        if w.startswith("-") and "c" in w and j + 1 < len(words):
            return _parse_cached(_unquote(words[j + 1])[: 4 * PARSE_CHARS])
    return None


def _looks_like_args(command: str) -> bool:
    s = command.lstrip()
    return s[:1] in "{[" and not _LABEL_RE.match(s.split(None, 1)[0] if s.split() else "")


@lru_cache(maxsize=16384)
def _keys_cached(head: str | None, tool_name: str | None, starts_with_tool: bool) -> tuple[str, ...]:
    keys: list[str] = []
    tool = normalize_program(tool_name) if tool_name else None
    if tool and tool.startswith("functions."):
        tool = tool[len("functions.") :]
    if head and _looks_like_args(head):
        return (tool, "*") if tool else ("*",)
    prog = sub = None
    if head and head.strip():
        prog, sub = _parse_cached(head)
    if prog:
        if sub:
            keys.append(f"{prog}:{sub}")
        keys.append(prog)
    if (
        tool
        and tool not in SHELL_TOOL_NAMES
        and tool not in _SETUP
        and tool not in _WRAPPERS
        and tool not in keys
        and not starts_with_tool
    ):
        keys.append(tool)
    if prog:
        keys.append(QUICK_KEY if prog in _QUICK or prog in _SETUP else PROGRAM_KEY)
    keys.append("*")
    return tuple(keys)


def command_keys(command: str | None, tool_name: str | None = None) -> list[str]:
    """The back-off chain of table keys for one tool call, most specific first, always ending with ``"*"``.

    ``"cd /r && python -m pytest -k x"`` -> ``["python:pytest", "python", "(program)", "*"]``. A
    function-calling tool (``tool_name`` given, ``command`` its JSON arguments) keys by the tool name. A tool
    name that is neither a shell tool nor the parsed program adds one more back-off level after the program;
    a shell command then backs off to its kind (:data:`QUICK_KEY` or :data:`PROGRAM_KEY`) before ``*``.
    """
    head = command[: 4 * PARSE_CHARS] if command else None
    tool = tool_name.strip() if tool_name else None
    starts = bool(command and tool and command.lstrip().lower().startswith(tool.lower()))
    return list(_keys_cached(head, tool or None, starts))


def split_command(command: str | None) -> tuple[str | None, str | None]:
    """The store's ``(tool_name, main_program)``: the command's first word and the program
    :func:`parse_command` finds (``"echo hi | python3 sol.py"`` -> ``("echo", "python")``);
    ``(None, None)`` for an empty command."""
    if not command or not command.strip():
        return None, None
    first = command.strip().split(None, 1)[0]
    prog, _ = parse_command(command)
    return first, prog or first
