"""Small leaf utilities any module may use: errors, atomic file I/O, checkpoints, progress, devices."""
