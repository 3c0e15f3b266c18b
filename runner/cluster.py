"""The Dask cluster a run's Experiments notebooks spread their sweeps over: started for the run, or one
already running."""
import contextlib
import signal

from .folders import Refused


@contextlib.contextmanager
def dask_cluster(scheduler):
    """The address of the Dask scheduler the Experiments notebooks get, open for the run: a LocalCluster
    of `scheduler` workers started now (a number), the running one at `scheduler` (a string, checked
    reachable first), or None: serial."""
    if scheduler is None:
        yield None
        return
    from rconv.common.errors import RConvError
    from rconv.studies.executors import executor_for
    opened = contextlib.ExitStack()
    # The cluster's processes inherit an ignored SIGINT: Ctrl-C then reaches run_all alone, which closes
    # the cluster in order, instead of every worker printing its own KeyboardInterrupt.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        client = opened.enter_context(executor_for(scheduler))
    except (RConvError, ImportError, OSError) as error:
        raise Refused(str(error)) from error
    finally:
        signal.signal(signal.SIGINT, previous)
    with opened:
        print(f"Experiments on the Dask cluster at {client.scheduler.address} "
              f"({len(client.scheduler_info()['workers'])} workers)", flush=True)
        yield client.scheduler.address
