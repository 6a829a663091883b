"""Training text for the demo checkpoints: the Python 3.11 documentation from Debian.

Source: the Debian package ``python3.11-doc`` (pinned below by version and sha256), whose
``html/_sources`` folder holds the documentation's reStructuredText. License: the Python
Software Foundation License Version 2 (documentation; code examples also under the Zero-Clause
BSD licence), which allows derived works such as weights trained on it to be redistributed;
see ``/usr/share/doc/python3.11-doc/copyright`` inside the package.

Two streams come out of it:
- documents: every page, lightly cleaned of Sphinx markup (roles, labels, index entries);
- chat pairs: questions with answers taken from the text itself (FAQ questions and their
  answers, glossary terms, module synopses and the first paragraph of each documented function,
  method and class), rendered later with the official Qwen3.5 chat template.

A fixed 5 % of the pages and of the pairs (by a hash of their name) is held out for perplexity.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

DEB_NAME = "python3.11-doc"
DEB_VERSION = "3.11.2-6+deb12u8"
DEB_SHA256 = "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b"
SOURCES = "./usr/share/doc/python3.11/html/_sources/"
SOURCE_NOTE = (
    f"Python 3.11 documentation (reStructuredText sources), Debian package {DEB_NAME} "
    f"{DEB_VERSION} (sha256 {DEB_SHA256[:16]}…); Python Software Foundation License Version 2"
)


class CorpusError(RuntimeError):
    pass


def fetch_deb(cache: Path, deb: Path | None = None) -> Path:
    """The pinned .deb: deb if given, else from cache, else ``apt-get download``; sha256 checked."""
    path = deb or cache / f"{DEB_NAME}_{DEB_VERSION.replace(':', '%3a')}_all.deb"
    if deb is None and not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        if shutil.which("apt-get") is None:
            raise CorpusError(
                f"apt-get is not available; download {DEB_NAME}_{DEB_VERSION}_all.deb "
                "from a Debian mirror and pass it with --deb"
            )
        r = subprocess.run(
            ["apt-get", "download", f"{DEB_NAME}={DEB_VERSION}"], cwd=cache, capture_output=True, text=True
        )
        if r.returncode != 0 or not path.exists():
            raise CorpusError(
                f"apt-get download {DEB_NAME}={DEB_VERSION} failed ({r.stderr.strip()[-200:]}); "
                f"fetch that file from snapshot.debian.org and pass it with --deb"
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        raise CorpusError(
            f"{path} has sha256 {digest}, expected {DEB_SHA256}; pass the {DEB_NAME} {DEB_VERSION} package with --deb"
        )
    return path


def _ar_members(data: bytes):
    """(name, bytes) of a Unix ar archive (a .deb)."""
    if not data.startswith(b"!<arch>\n"):
        raise CorpusError("not a Debian package (no ar header)")
    pos = 8
    while pos + 60 <= len(data):
        header = data[pos : pos + 60]
        name = header[:16].decode().strip().rstrip("/")
        size = int(header[48:58].decode().strip())
        yield name, data[pos + 60 : pos + 60 + size]
        pos += 60 + size + (size & 1)


def read_sources(deb: Path) -> dict[str, str]:
    """{relative path: reStructuredText} of the documentation sources inside the package."""
    for name, blob in _ar_members(deb.read_bytes()):
        if name.startswith("data.tar"):
            out = {}
            with tarfile.open(fileobj=io.BytesIO(blob)) as tar:
                for m in tar.getmembers():
                    if m.isfile() and m.name.startswith(SOURCES) and m.name.endswith(".rst.txt"):
                        rel = m.name[len(SOURCES) : -len(".rst.txt")]
                        out[rel] = tar.extractfile(m).read().decode("utf-8")
            return dict(sorted(out.items()))
    raise CorpusError(f"{deb} has no data.tar member")


# --- cleaning ---------------------------------------------------------------------------------

_ROLE = re.compile(r":(?:[a-z]+:)?[a-z]+:`(?:~|!)?([^`<]*?)(?:\s*<([^`>]*)>)?`")
_FIELD = re.compile(r"^:[\w-]+:(\s|$)")  # a field (":tocdepth: 2", ":noindex:"), not a role
_LINK = re.compile(r"`([^`<]+?)\s*<[^`>]+>`__?")
_DROP_DIRECTIVES = (
    "index",
    "only",
    "contents",
    "toctree",
    "sectionauthor",
    "moduleauthor",
    "highlight",
    "testsetup",
    "testcleanup",
    "include",
    "literalinclude",
    "tabularcolumns",
    "raw",
    "audit-event",
    "impl-detail",
    "availability",
    "rubric",
    "currentmodule",
    "program",
    "seealso",
    "versionadded",
    "versionchanged",
    "deprecated",
    "glossary",
    "module",
)


def _role(m: re.Match) -> str:
    text, target = m.group(1).strip(), m.group(2)
    return f"``{text or target}``" if text and not target else (text or (target or ""))


def clean_inline(text: str) -> str:
    text = _LINK.sub(lambda m: m.group(1), text)
    text = _ROLE.sub(_role, text)
    text = text.replace("``", "`")
    return text


def clean_page(src: str) -> str:
    """Sphinx markup out, prose and code in: drops labels, comments and bookkeeping directives
    (with their indented bodies when they are index/toctree-like), keeps text and examples."""
    out, skip_indent = [], None
    for line in src.splitlines():
        stripped = line.lstrip()
        indent = len(line) - len(stripped)
        if skip_indent is not None:
            if not stripped or indent > skip_indent:
                continue
            skip_indent = None
        if stripped.startswith(".. _") or (_FIELD.match(stripped) and indent == 0):
            continue
        m = re.match(r"^\.\. ([a-z-]+)::\s*(.*)$", stripped)
        if m:
            name, arg = m.groups()
            if name in (
                "index",
                "toctree",
                "only",
                "contents",
                "tabularcolumns",
                "raw",
                "testsetup",
                "testcleanup",
                "include",
                "literalinclude",
                "audit-event",
            ):
                skip_indent = indent
                continue
            if name in _DROP_DIRECTIVES:
                if arg:
                    out.append(" " * indent + arg)
                continue
            if name in (
                "function",
                "method",
                "class",
                "attribute",
                "data",
                "exception",
                "decorator",
                "classmethod",
                "staticmethod",
                "describe",
                "opcode",
                "cmdoption",
                "option",
            ):
                out.append(" " * indent + arg.rstrip("\\").rstrip())
                continue
            if name in ("code-block", "sourcecode", "doctest"):
                out.append(" " * indent + "::")
                continue
            out.append(" " * indent + (name.capitalize() + ": " + arg if arg else name.capitalize() + ":"))
            continue
        if stripped.startswith(".. "):  # comment
            skip_indent = indent
            continue
        if stripped.startswith(":") and re.match(
            r"^:(noindex|module|synopsis|platform|deprecated|"
            r"async|abstractmethod|type|value|canonical|no-typesetting)\b",
            stripped,
        ):
            continue
        out.append(line)
    text = clean_inline("\n".join(out))
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip() + "\n"


# --- question / answer pairs ------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    key: str  # a stable name (the held-out split hashes it)
    question: str
    answer: str


def _paragraph(lines: list[str], start: int, indent: int, max_chars: int = 700) -> str:
    """Text of the paragraphs indented at least `indent` from line start, up to max_chars."""
    paras, cur = [], []
    i = start
    while i < len(lines):
        line = lines[i]
        if line.strip() and len(line) - len(line.lstrip()) < indent:
            break
        if line.strip().startswith(".. ") or _FIELD.match(line.strip()):
            if cur:
                paras.append(" ".join(cur))
                cur = []
            if line.strip().startswith(".. "):
                break
            i += 1
            continue
        if not line.strip():
            if cur:
                paras.append(" ".join(cur))
                cur = []
                if len(" ".join(paras)) > max_chars // 2:
                    break
        else:
            cur.append(line.strip())
        i += 1
    if cur:
        paras.append(" ".join(cur))
    text = "\n\n".join(p for p in paras if not p.endswith("::") or len(p) > 2)
    text = clean_inline(text).replace("::", ":")
    if len(text) > max_chars:
        cut = text.rfind(". ", 0, max_chars)
        text = text[: cut + 1] if cut > 0 else text[:max_chars]
    return text.strip()


def _faq_pairs(rel: str, src: str) -> list[Pair]:
    lines = src.splitlines()
    pairs = []
    for i in range(len(lines) - 2):
        title, under = lines[i].strip(), lines[i + 1].strip()
        if title.endswith("?") and under and set(under) <= set("-=~^") and len(under) >= len(title) - 1:
            end = next(
                (
                    j
                    for j in range(i + 2, len(lines) - 1)
                    if lines[j].strip() and re.fullmatch(r"[-=~^*]{4,}", lines[j + 1].strip())
                ),
                len(lines),
            )
            answer = _paragraph(lines[:end], i + 2, 0, 900)
            if len(answer) > 20:
                pairs.append(Pair(f"faq:{rel}:{title}", clean_inline(title), answer))
    return pairs


def _glossary_pairs(src: str) -> list[Pair]:
    lines = src.splitlines()
    pairs = []
    for i, line in enumerate(lines):
        if re.match(r"^   \S", line) and i + 1 < len(lines) and re.match(r"^      \S", lines[i + 1]):
            term = clean_inline(line.strip()).strip("`")
            answer = _paragraph(lines, i + 1, 6)
            if answer:
                pairs.append(Pair(f"glossary:{term}", term, answer))
    return pairs


_GLOSSARY_Q = ("What is {t} in Python?", 'What does "{t}" mean?', "Explain {t}.", "Define {t}.")
_MODULE_Q = ("What is the {m} module for?", "What does the {m} module do?", "Which module should I use to {s}?")
_FUNC_Q = ("What does {n} do?", "Explain {n}.", "How do I use {n}?", "What is {n} in the {m} module?")


def _library_pairs(rel: str, src: str) -> list[Pair]:
    lines = src.splitlines()
    pairs, module, cls = [], None, None
    for i, line in enumerate(lines):
        m = re.match(r"^\.\. module:: (\S+)", line)
        if m:
            module = m.group(1)
            if i + 1 < len(lines):
                s = re.match(r"^\s+:synopsis: (.+)$", lines[i + 1])
                if s:
                    pairs.append(Pair(f"module:{module}", module, clean_inline(s.group(1)).rstrip(".")))
            continue
        m = re.match(
            r"^(\s*)\.\. (function|method|class|exception|decorator|classmethod|staticmethod):: "
            r"([A-Za-z_][\w.]*)(\(.*)?$",
            line,
        )
        if not m or module is None:
            continue
        indent, kind, name, _sig = m.groups()
        if kind in ("class", "exception") and not indent:
            cls = name
        qual = name if "." in name or kind in ("class", "exception") or not indent else f"{cls}.{name}"
        full = qual if qual.startswith(module + ".") or module == "builtins" else f"{module}.{qual}"
        j = i + 1
        while j < len(lines) and (
            lines[j].rstrip().endswith("\\")
            or lines[j - 1].rstrip().endswith("\\")
            or re.match(r"^\s+\.\. \w+:: ", lines[j])
            or re.match(r"^\s+:\w+:", lines[j])
        ):
            j += 1
        body = _paragraph(lines, j, len(indent) + 3)
        if len(body) > 20:
            shown = full + ("()" if kind in ("function", "method", "classmethod", "staticmethod") else "")
            pairs.append(Pair(f"api:{full}", shown, f"{kind}:{module}:{body}"))
    return pairs


def chat_pairs(sources: dict[str, str], seed: int = 0) -> list[tuple[str, str, str]]:
    """(key, question, answer) pairs from the FAQ, the glossary and the library reference."""
    rng = random.Random(seed)
    out = []
    for rel, src in sources.items():
        if rel.startswith("faq/"):
            out += [(p.key, p.question, p.answer) for p in _faq_pairs(rel, src)]
        elif rel == "glossary":
            for p in _glossary_pairs(src):
                q = rng.choice(_GLOSSARY_Q).format(t=p.question)
                out.append(
                    (
                        p.key,
                        q,
                        f"{p.question[:1].upper()}{p.question[1:]}: {p.answer}"
                        if not p.answer.lower().startswith(p.question.lower())
                        else p.answer,
                    )
                )
        elif rel.startswith("library/"):
            for p in _library_pairs(rel, src):
                if p.key.startswith("module:"):
                    mod, synopsis = p.question, p.answer
                    q = rng.choice(_MODULE_Q).format(m=mod, s=synopsis[:1].lower() + synopsis[1:])
                    out.append((p.key, q, f"The `{mod}` module: {synopsis}."))
                else:
                    kind, mod, body = p.answer.split(":", 2)
                    q = rng.choice(_FUNC_Q).format(n=f"`{p.question}`", m=f"`{mod}`")
                    art = "an" if kind[0] in "aeiou" else "a"
                    out.append((p.key, q, f"`{p.question}` is {art} {kind} in the `{mod}` module. {body}"))
    return out


def held_out(key: str, percent: int = 5) -> bool:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 100 < percent
