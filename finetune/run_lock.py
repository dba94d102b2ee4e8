"""One training at a time in an output_dir. A second run started into the folder of a running one (a job submitted
twice, a second terminal, a resume while the first still runs) would remove its half-written checkpoint, save its
own checkpoints between the first's and rotate them away. The main process holds an exclusive lock on a file in
the folder while it runs, and removes the file when it ends; the OS releases the lock however the process ends
(``kill -9`` included). The lock is the process's: a run started again in a process that holds it takes it
again."""

import datetime
import functools
import os
import socket
from typing import Dict

LOCK_NAME = '.modelscope-sd.lock'
_held: Dict[str, object] = {}  # output_dir (absolute) → its open lock file, in this process


def hold(output_dir: str) -> None:
    """Take ``output_dir``'s lock for this run (its main process; the others return), or raise ``ValueError``
    naming the process that holds it."""
    if _global_rank() != 0:
        return
    try:
        import fcntl
    except ImportError:  # Windows: no advisory file locks; one run per folder is then the user's to keep
        return
    key = os.path.abspath(output_dir)
    if key in _held:
        return
    lock = open(os.path.join(key, LOCK_NAME), 'a+', encoding='utf-8')
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or 'another process'
        lock.close()
        raise ValueError(f'output_dir={output_dir!r} is in use by another training ({holder}): wait for it to end '
                         'or stop it (Ctrl-C or kill saves its checkpoint), or choose another output_dir.') from None
    lock.seek(0)
    lock.truncate()
    started = datetime.datetime.now().strftime('%Y-%m-%d %H:%M:%S')
    lock.write(f'process {os.getpid()} on {socket.gethostname()}, started {started}')
    lock.flush()
    _held[key] = lock


def _global_rank() -> int:
    """This process's rank from its launcher (torchrun, which accelerate launches, or MPI), before an accelerator
    exists: accelerate's PartialState made this early would set up the processes without the Accelerator's own
    settings (cpu=True from ACCELERATE_USE_CPU)."""
    names = ('RANK', 'PMI_RANK', 'OMPI_COMM_WORLD_RANK', 'MV2_COMM_WORLD_RANK')
    return next((int(os.environ[name]) for name in names if os.environ.get(name, '').isdigit()), 0)


def release(output_dir: str) -> None:
    """Let another process train into ``output_dir``: the lock file goes (a finished model folder keeps no trace of
    it), and closing it releases the lock."""
    lock = _held.pop(os.path.abspath(output_dir), None)
    if lock is not None:
        try:
            os.remove(lock.name)
        except FileNotFoundError:
            pass
        lock.close()


def releasing(main):
    """A trainer's ``main(config, notes)`` that lets go of its output_dir's lock however it ends (a finished run,
    an error, a stop), so that this process, or another, can train there next."""
    @functools.wraps(main)
    def run(config, notes=None):
        try:
            return main(config, notes)
        finally:
            release(config.output_dir)
    return run
