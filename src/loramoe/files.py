"""Files: crash-safe writing, and bounded reading of the YAML configs and small JSON documents.

Writing goes to a temporary file in the same directory, is fsynced, then renamed atomically over the target, so a
reader (or a resumed run) sees either the old file or the complete new one, never half of it.

Reading is bounded: YAML configs and small JSON documents are read with limits on size, nesting depth and YAML
alias expansion, from regular files only. A hostile or mistaken file therefore ends in a one-line error naming it,
never in memory exhaustion (YAML aliases expanding a few lines into billions of values), a recursion error
(thousands of nested brackets) or a read that blocks forever (a FIFO) or never ends (``/dev/zero``). A YAML key
given twice in one mapping is an error too: the parser would otherwise keep the last one silently; so is a key
given twice in one JSON object (``loramoe.strict_json``, for small documents and data records alike). Integers in
both are bounded (``loramoe.validation.MAX_INT_DIGITS``). The limits are far above any real config: a run config is a
few hundred bytes, a dozen levels deep.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from loramoe.errors import ConfigError, FileSystemError, LoRAMoEError, is_write_fault
from loramoe.strict_json import JSONRefused, StrictDecoder
from loramoe.validation import too_long_int

# YAML 1.1 (PyYAML) reads ``1e-4`` (no dot) as a string; YAML 1.2 and users read it as a float.
YAML_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside ``path`` durable (no-op where directories cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _new_file_mode() -> int:
    """0o666 less the process umask: the permissions ``open(path, "w")`` gives a new file."""
    try:  # read without changing it: setting the umask, even for an instant, races with other threads' files
        with open("/proc/self/status", encoding="ascii") as f:
            umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        umask = os.umask(0o022)
        os.umask(umask)
    return 0o666 & ~umask


# The tag of the temporary files ``atomic_path`` makes in this context (a run id, see ``tagged_temp_files``).
_TEMP_TAG: contextvars.ContextVar[str | None] = contextvars.ContextVar("loramoe_temp_tag", default=None)


@contextlib.contextmanager
def tagged_temp_files(tag: str) -> Iterator[None]:
    """Name every temporary file ``atomic_path`` makes in this block ``.<name>.<tag>-<random>.tmp``.

    A failed write removes its temporary file, but a killed process cannot; a run writes with its run id as the
    tag, so that the next process of the same run can prove such a leftover is its own (``leftover_temp_files``)
    and finish it. Untagged temporary files (``.<name>.<random>.tmp``) prove nothing and are never swept.
    """
    if not re.fullmatch(r"[0-9A-Za-z_]+", tag):
        raise ValueError(f"a temporary file tag is letters, digits and _, got {tag!r}")
    token = _TEMP_TAG.set(tag)
    try:
        yield
    finally:
        _TEMP_TAG.reset(token)


def leftover_temp_files(folder: str | os.PathLike, tag: str) -> list[Path]:
    """The regular files in ``folder`` (not in its subfolders, not through links) that ``atomic_path`` made under
    ``tagged_temp_files(tag)`` and a kill left behind."""
    found = []
    for path in Path(folder).glob(f".*.{tag}-*.tmp"):
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(path).st_mode):
                found.append(path)
    return found


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds it is fsynced and renamed onto ``path``.

    On an exception the temporary file is removed and ``path`` is left untouched; the file system's faults (a full
    disk, a file-size limit) become a ``FileSystemError`` naming ``path``. The file gets the permissions a
    plain ``open(path, "w")`` would give it (0o666 less the umask), whatever the block wrote it with.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tag = _TEMP_TAG.get()
    prefix = f".{target.name}.{tag}-" if tag else f".{target.name}."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # mkstemp makes the file 0o600 and a writer may replace it with its own (safetensors does): set the mode
        # a plain open() gives, now that the block is done
        os.chmod(tmp_path, _new_file_mode())
        with open(tmp_path, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, target)
        fsync_dir(target.parent)
    except BaseException as err:
        tmp_path.unlink(missing_ok=True)
        if isinstance(err, Exception) and not isinstance(err, LoRAMoEError) and is_write_fault(err):
            raise FileSystemError.from_fault(err, target, doing="writing") from err
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


MAX_YAML_BYTES = 1 << 20
MAX_JSON_BYTES = 16 << 20  # small JSON documents: configs, markers, metadata (not data sets)
MAX_DEPTH = 32
MAX_NODES = 100_000  # values after alias expansion

_SPECIAL = {
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
    stat.S_ISSOCK: "a socket",
}


def not_regular(path: str | os.PathLike) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a directory (``"a FIFO (named pipe)"``),
    else None. Reading such a path can block forever or never end, so no loramoe reader opens one."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    return next((what for test, what in _SPECIAL.items() if test(mode)), "not a regular file")


def check_regular(file: str | os.PathLike, error: type[LoRAMoEError] = ConfigError, **error_kw: Any) -> None:
    """Raise ``error`` when ``file`` exists and is a FIFO, device or socket. ``error_kw`` (``path=`` for a
    ``DataError``) makes the error name the file itself; otherwise the message starts with the path."""
    what = not_regular(file)
    if what is not None:
        prefix = "" if error_kw else f"{file}: "
        raise error(f"{prefix}is {what}, not a regular file; give a file", **error_kw)


def read_text(
    path: str | os.PathLike, *, max_bytes: int, error: type[LoRAMoEError] = ConfigError, what: str = "file"
) -> str:
    """The UTF-8 text of a regular file of at most ``max_bytes``; errors name the file."""
    check_regular(path, error)
    size = os.stat(path).st_size
    if size > max_bytes:
        raise error(f"{path}: {size} bytes, more than a {what} can be ({max_bytes}); is this the right file?")
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not valid JSON (not UTF-8 text: {err.reason}); the file is damaged") from err


def read_json(
    path: str | os.PathLike,
    *,
    error: type[LoRAMoEError] = ConfigError,
    what: str = "JSON file",
    max_bytes: int = MAX_JSON_BYTES,
    constants: bool = False,
) -> Any:
    """Parse a small JSON document: regular file, bounded size, depth and integers, no key twice in an object,
    and no NaN or Infinity unless ``constants``."""
    text = read_text(path, max_bytes=max_bytes, error=error, what=what)
    try:
        value = StrictDecoder(constants=constants).decode(text)
    except JSONRefused as err:
        raise error(f"{path}{err.where()}: {err.problem}") from None
    except (json.JSONDecodeError, ValueError) as err:
        reason = (str(err).splitlines() or [type(err).__name__])[0]
        raise error(f"{path}: not valid JSON ({reason}); the file is damaged, save it again") from err
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    _check_size(value, str(path), error)
    return value


class _Refused(Exception):
    """A document that parses but is refused (too deep, a key twice): never read as plain text instead."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem, self.problem_mark = problem, mark


def parse_yaml(text: str, where: str, *, max_bytes: int = MAX_YAML_BYTES, or_text: bool = False) -> Any:
    """Parse YAML safely (no tags, no objects), with the size, depth and expansion limits and no duplicated keys.

    Args:
        text: the YAML text.
        where: what it is, for messages (a file name, or ``override 'a.b=...'``).
        max_bytes: the largest text accepted.
        or_text: return ``text`` itself when it is not valid YAML (a command-line value such as ``a: b``), but
            never for a document that is refused for its depth, size or a duplicated key.

    Raises:
        ConfigError: invalid YAML (with the line), a duplicated key, or a limit exceeded.
    """
    import yaml

    if len(text) > max_bytes:
        raise ConfigError(f"{where}: {len(text)} characters, more than a config can be ({max_bytes})")
    try:
        data = yaml.load(text, Loader=_loader())  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, _Refused) as err:
        if or_text and not isinstance(err, _Refused):
            return text
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}{line}: invalid YAML ({problem})") from err
    except RecursionError:
        raise ConfigError(f"{where}: invalid YAML (nested too deeply)") from None
    _check_size(data, where, ConfigError)
    return data


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML mapping (bounded, see the module docstring); errors name the file and line."""
    data = load_yaml_file(path)
    if data is None:
        raise ConfigError(f"{path}: the config is empty")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}: the config must be a mapping of keys to values, got {type(data).__name__}"
        )
    return data


def load_yaml_file(path: str | os.PathLike) -> Any:
    """``parse_yaml`` of a regular UTF-8 file; errors name the file."""
    p = Path(path)
    if not p.is_file() and not_regular(p) is None:
        raise ConfigError(f"{p}: config file not found")
    check_regular(p)
    size = p.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ConfigError(
            f"{p}: {size} bytes, more than a config can be ({MAX_YAML_BYTES}); is this the config?"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{p}: not UTF-8 text ({err.reason}); save the config as UTF-8") from err
    return parse_yaml(text, str(p))


def _check_size(value: Any, where: str, error: type[LoRAMoEError]) -> None:
    """Count the values of a parsed document as a reader walking it would meet them (an alias counted at each
    use), up to ``MAX_NODES``, and its depth, up to ``MAX_DEPTH``. Shared (aliased) values are walked again, so
    a few lines of aliases that expand into billions of values, or a self-referencing value, stop at the limit."""
    stack = [(value, 1)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise error(
                f"{where}: expands to more than {MAX_NODES} values (YAML aliases?); write it out plainly"
            )
        if depth > MAX_DEPTH:
            raise error(f"{where}: nested deeper than {MAX_DEPTH} levels")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for v in node.values())
            seen += len(node)  # the keys
        elif isinstance(node, (list, tuple)):
            stack.extend((v, depth + 1) for v in node)


def _loader():
    """A SafeLoader that refuses duplicated keys and deep nesting, and reads ``1e-4`` as a float."""
    import yaml

    class Loader(yaml.SafeLoader):
        _depth = 0

        def compose_node(self, parent, index):
            self._depth += 1
            try:
                if self._depth > MAX_DEPTH:
                    mark = self.peek_event().start_mark
                    raise _Refused(f"nested deeper than {MAX_DEPTH} levels", mark)
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1

        def construct_mapping(self, node, deep=False):
            if isinstance(node, yaml.MappingNode):
                lines: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *base` then a key of the base: an intended override, not a duplicate
                    key = self.construct_object(key_node, deep=True)
                    try:
                        first = lines.get(key)
                    except TypeError:
                        continue  # an unhashable key: the SafeLoader reports it
                    if first is not None:
                        raise _Refused(
                            f"key {key!r} given twice (first on line {first + 1}); keep one",
                            key_node.start_mark,
                        )
                    lines[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep)

        def construct_bounded_int(self, node):
            problem = too_long_int(str(node.value))
            if problem is not None:
                raise _Refused(problem, node.start_mark)
            return self.construct_yaml_int(node)

    Loader.add_constructor("tag:yaml.org,2002:int", Loader.construct_bounded_int)

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float", re.compile(f"^{YAML_FLOAT.pattern}$"), list("-+0123456789.")
    )
    return Loader
