"""rconv_core: the facade's public API is exactly what __all__ lists, each name documented."""
import rconv_core as rc


def test_the_public_api_is_what_all_lists():
    assert sorted(set(rc.__all__)) == sorted(rc.__all__)
    missing = [name for name in rc.__all__ if not hasattr(rc, name)]
    assert not missing
    undocumented = [name for name in rc.__all__ if callable(getattr(rc, name)) and not getattr(rc, name).__doc__]
    assert not undocumented
