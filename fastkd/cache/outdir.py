"""The output directory of a ``fastkd cache`` run: its lock, what ``--overwrite`` may remove, and
one-sentence errors for the environment problems of writing. The lock is a ``flock`` on the
directory itself, which the kernel drops however the process ends: no stale lock, no lock file.
"""
import contextlib
import errno
import os
from typing import Iterable, Optional, Set

from fastkd.cache import manifest as fmt

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX (Windows): runs are not locked there
    fcntl = None

# The progress bars of the commands that write a cache or an export appear only after this many
# seconds, so that a run failing at its first batch (an option checked against the teacher's
# first output) prints its error alone
PROGRESS_DELAY_S = 0.5

# errno -> what it means for the cache directory, and what to do
_SPACE = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)


class DirectoryLock:
    """Exclusive, non-blocking ``flock`` on a directory, released by :meth:`release` or by the
    process ending. Raises :class:`CacheError` naming the directory when another run holds it."""

    def __init__(self, directory: str):
        self.directory = directory
        self.fd: Optional[int] = None

    def acquire(self) -> "DirectoryLock":
        if fcntl is None:
            return self
        fd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise fmt.CacheError(
                    f"{lock_holder(self.directory)} is writing to {self.directory} (it holds the "
                    f"directory's lock); wait for it to finish or choose another --out") from None
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the lock
            self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


def lock_holder(directory: str) -> str:
    """Who holds ``directory``'s lock, in words (from /proc/locks and the holder's command
    line), or "another run" where the system does not say."""
    try:
        status = os.stat(directory)
        inode = f"{os.major(status.st_dev):02x}:{os.minor(status.st_dev):02x}:{status.st_ino}"
        with open("/proc/locks") as handle:
            pids = [fields[4] for fields in map(str.split, handle)
                    if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == inode]
    except (OSError, ValueError):
        return "another run"
    if not pids or not pids[0].isdigit():
        return "another run"
    pid = pids[0]
    if int(pid) == os.getpid():
        return f"another writer in this process (pid {pid})"
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read(4096).decode("utf-8", "replace").split("\0")
    except OSError:
        argv = []
    for position, word in enumerate(argv[:-1]):
        if os.path.basename(word) == "fastkd" and argv[position + 1] in ("cache", "import"):
            return f"another `fastkd {argv[position + 1]}` run (pid {pid})"
    return f"another process (pid {pid})"


def explain_os_error(error: OSError, out_dir: str) -> fmt.CacheError:
    """A CacheError saying in a sentence what went wrong writing into ``out_dir`` and what to
    do (finished shards stay recorded: re-run the same command)."""
    what = f" ({error.filename})" if getattr(error, "filename", None) else ""
    if error.errno in _SPACE:
        return fmt.CacheError(
            f"no space left on the device of --out {out_dir}{what}; free some space (or choose "
            f"another --out) and re-run the same command: finished shards are kept and it "
            f"resumes")
    if error.errno in _NOT_WRITABLE:
        return fmt.CacheError(
            f"cannot write to --out {out_dir}{what}: {error.strerror or error}; choose a "
            f"directory you can write to")
    return fmt.CacheError(f"writing the cache in {out_dir} failed{what}: "
                          f"{error.strerror or error}")


@contextlib.contextmanager
def removed_on_failure_if_new(out_dir: str):
    """The body makes ``out_dir`` (when missing) and writes into it; when the body fails and
    ``out_dir`` did not exist before it and is still empty, the directory is removed again, so a
    refused run leaves nothing behind (a run that wrote anything keeps it, to resume)."""
    existed = os.path.lexists(out_dir)
    try:
        yield
    except BaseException:
        if not existed:
            try:
                os.rmdir(out_dir)   # only succeeds when the directory is empty
            except OSError:
                pass
        raise


def make_directory(out_dir: str) -> None:
    """Create ``out_dir`` (and parents) and check that it is a writable directory."""
    if not out_dir:
        raise fmt.CacheError("--out is empty; give a directory path for the cache")
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise fmt.CacheError(f"--out {out_dir} exists and is not a directory; give a directory "
                             f"path for the cache")
    try:
        os.makedirs(out_dir, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise fmt.CacheError(f"--out {out_dir}: a part of this path is a file, not a "
                             f"directory; give a directory path for the cache") from None
    except OSError as error:
        raise explain_os_error(error, out_dir) from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise fmt.CacheError(f"cannot write to --out {out_dir} (no permission or a read-only "
                             f"file system); choose a directory you can write to")


def _listed_files(manifest: dict) -> Set[str]:
    """Plain file names a (possibly damaged) manifest lists, read defensively."""
    shards = manifest.get("shards")
    entries = [manifest.get("offsets"), manifest.get("labels")]
    for shard in shards if isinstance(shards, list) else []:
        files = shard.get("files") if isinstance(shard, dict) else None
        entries += list(files.values()) if isinstance(files, dict) else []
    names = [entry.get("file") for entry in entries if isinstance(entry, dict)]
    return {name for name in names if isinstance(name, str) and fmt.PLAIN_FILE_NAME.fullmatch(name)}


def owned_files(out_dir: str, names: Iterable[str]) -> Optional[Set[str]]:
    """The files of ``names`` (a listing of ``out_dir``) that fastkd owns: every manifest and
    progress manifest, the files they list, and fastkd's temp files. None when the directory
    holds other files and no manifest, i.e. it is not a fastkd cache."""
    names = set(names)
    manifests = {name for name in names if fmt.is_progress_manifest(name)}
    owned = {name for name in names if fmt.is_temp_file(name)} | manifests
    for name in manifests:
        manifest = fmt.parse_manifest_file(out_dir, name)[0]  # unreadable: CacheError, stop
        owned |= _listed_files(manifest) & names
    if not manifests and names - owned:
        return None
    return owned


def clear_for_overwrite(out_dir: str) -> None:
    """Remove what fastkd owns in ``out_dir`` (see :func:`owned_files`) and nothing else;
    refuse a non-empty directory that is not a fastkd cache."""
    names = os.listdir(out_dir)
    try:
        owned = owned_files(out_dir, names)
    except fmt.CacheError as error:
        raise fmt.CacheError(f"--overwrite: {error}; fastkd cannot tell which files in "
                             f"{out_dir} are its own, so it removes none (delete the directory "
                             f"yourself if it is a cache)") from None
    if owned is None:
        raise fmt.CacheError(f"--overwrite refused: {out_dir} is not a fastkd cache (it holds "
                             f"other files and no manifest.json); choose an empty or new "
                             f"directory")
    # the manifests go last, so an interrupted removal still lists what is left
    for name in sorted(owned, key=fmt.is_progress_manifest):
        try:
            os.remove(os.path.join(out_dir, name))
        except FileNotFoundError:
            pass
        except OSError as error:
            raise explain_os_error(error, out_dir) from None
