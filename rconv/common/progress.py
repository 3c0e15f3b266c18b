"""Progress bars for the long loops (tqdm; silent unless asked for)."""


def progress_bar(items=None, *, total=None, desc, unit, enabled, mininterval=1.0):
    """A tqdm progress bar over items (or a manual one of `total` steps); a silent one unless enabled."""
    from tqdm import tqdm
    return tqdm(items, total=total, desc=desc, unit=unit, mininterval=mininterval, disable=not enabled)
