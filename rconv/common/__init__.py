"""What every part of the suite shares: its one exception, conv geometry, paths, progress bars, argument checks."""
