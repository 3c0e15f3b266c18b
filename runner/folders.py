"""The results folders run_all writes: which it may write to (its marker says whether they hold quick or
full results), its lock, and files replaced whole, never in part."""
import contextlib
import json
import os
import shutil
import signal
import tempfile
from pathlib import Path

from . import ROOT

STORED_RESULTS = ROOT / "results"  # the full results the repository keeps, beside the stored notebooks
MARKER = ".run_all.json"  # in every results folder run_all made: {"kind": "full" or "quick"}
LOCK = ".run_all.lock"  # held by the run writing to a results folder
STAGING = ".staging-"  # prefix of a notebook's staging folder inside the results folder
KINDS = ("full", "quick")


class Refused(Exception):
    """A results folder run_all must not (or cannot) write to; the message says why."""


def beside(path, text):
    """A new file next to `path` holding `text`, ready to replace it with a rename."""
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.staged-", dir=path.parent)
    try:
        with os.fdopen(handle, "w") as file:
            file.write(text)
        os.chmod(temporary, 0o644)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return Path(temporary)


def write_atomically(path, text):
    """Write a file so that a reader (or a crash) sees the old content or the new, never a part."""
    os.replace(beside(path, text), path)


def relative(path):
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def read_marker(folder):
    """The kind of results a folder of run_all's holds ("full" or "quick"), or None when it is not one."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    try:
        kind = json.loads(marker.read_text()).get("kind")
    except (OSError, ValueError, AttributeError) as error:
        raise Refused(f"{marker} cannot be read ({error}); remove it only if {folder} holds nothing you "
                       f"need") from error
    if kind not in KINDS:
        raise Refused(f"{marker} names kind {kind!r}, not one of {', '.join(KINDS)}")
    return kind


def check_results_dir(results_dir, kind):
    """Refuse, before anything is written, a results folder this run must not write to."""
    if kind == "quick" and results_dir == STORED_RESULTS:
        raise Refused(f"a quick run never writes into {relative(STORED_RESULTS)}/, which holds the full "
                       f"results beside the stored notebooks; give another --results-dir")
    for parent in results_dir.parents:
        if (parent / MARKER).is_file():
            raise Refused(f"{results_dir} lies inside the results folder {parent} of run_all.py; give a "
                           f"folder outside it")
    if results_dir.exists() and not results_dir.is_dir():
        raise Refused(f"--results-dir {results_dir} is a file, not a folder")
    if not results_dir.is_dir():
        return
    held = read_marker(results_dir)
    try:
        empty = all(entry.name == LOCK for entry in results_dir.iterdir())  # a lock alone holds no results
    except OSError as error:
        raise Refused(f"cannot read {results_dir} ({error.strerror or error})") from error
    if held is None and not empty:
        raise Refused(f"{results_dir} is not empty and is not a results folder of run_all.py (it has no "
                       f"{MARKER}); give an empty or new folder")
    if held is not None and held != kind:
        raise Refused(f"{results_dir} holds {held} results; a {kind} run never writes over them, so give "
                       f"another folder (or remove {results_dir})")


@contextlib.contextmanager
def results_folder(results_dir, kind):
    """The results folder, created if need be, marked as run_all's, and locked for this run (the
    operating system releases the lock when its holder exits, however it exits)."""
    from filelock import FileLock, Timeout
    check_results_dir(results_dir, kind)
    # The holder's process id goes into the lock file, for a refused run to name it.
    lock = FileLock(results_dir / LOCK, blocking=False, preserve_lock_file=True,
                    on_acquired=lambda handle: (os.ftruncate(handle, 0), os.pwrite(handle, str(os.getpid()).encode(), 0)))
    try:
        results_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout as error:
        holder = (results_dir / LOCK).read_text(errors="replace").strip()
        raise Refused(f"another run_all.py{f' (process {holder})' if holder else ''} is writing to "
                       f"{results_dir} (it holds {LOCK}); wait for it to finish") from error
    except OSError as error:
        raise Refused(f"cannot write results to {results_dir} ({error.strerror or error})") from error
    try:
        check_results_dir(results_dir, kind)  # again, now that no other run can change it
        if read_marker(results_dir) is None:
            write_atomically(results_dir / MARKER, json.dumps({"kind": kind}) + "\n")
        for leftover in results_dir.glob(f"{STAGING}*"):  # of runs that failed or were killed
            shutil.rmtree(leftover, ignore_errors=True)
        yield results_dir
    finally:
        lock.release()


@contextlib.contextmanager
def _interrupts_held():
    """Hold Ctrl-C (and SIGTERM) until the block is done, then raise KeyboardInterrupt: a commit is all or
    nothing."""
    received = []
    previous = {number: signal.signal(number, lambda number, frame: received.append(number))
                for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if received:
            raise KeyboardInterrupt


def store(stage, folder, texts):
    """Put a succeeded notebook's staged results (stage/results) in place of `folder`, and write `texts`
    (path -> text), all or nothing: every file is first written beside its destination, so that what
    remains is renames, done with Ctrl-C held. The staging folder goes after."""
    staged = stage / "results"
    staged.mkdir(exist_ok=True)  # a notebook that wrote nothing still replaces its folder
    for path in (folder, *texts):
        path.parent.mkdir(parents=True, exist_ok=True)
    ready = {}
    try:
        for destination, text in texts.items():
            ready[destination] = beside(destination, text)
        with _interrupts_held():
            replaced, had_folder = stage / "replaced", folder.exists()
            if had_folder:
                os.rename(folder, replaced)
            try:
                os.rename(staged, folder)
            except OSError:
                if had_folder:
                    os.rename(replaced, folder)
                raise
            for destination, temporary in ready.items():
                os.replace(temporary, destination)
    finally:
        for temporary in ready.values():
            temporary.unlink(missing_ok=True)
    shutil.rmtree(stage, ignore_errors=True)
