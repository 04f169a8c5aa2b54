"""The ground floor of the experiment side: errors, console output, atomic I/O, the run
directory, results, tracking and set-up. Imports nothing above it (only ``multimax`` and the
third-party stack)."""
