"""rconv.analysis.summaries: the tables' summaries, and the tables they refuse."""
import pandas as pd
import pytest

import rconv_core as rc


def test_summarize_refuses_an_empty_table():
    columns = ["dataset", "model", "dtype", "first_layer", "psnr", "ssim", "exact", "seconds"]
    with pytest.raises(rc.RConvError, match="summarize got an empty table"):
        rc.summarize(pd.DataFrame(columns=columns))
    with pytest.raises(rc.RConvError, match=r"missing \['psnr', 'ssim', 'exact', 'seconds'\]"):
        rc.summarize(pd.DataFrame())
