"""Everything on disk: atomic writes, locks, the HDF5 store and its journal, the checks of run files (schema),
run directories, and the one reader of every checkpoint format (checkpoints, with headers and the compact
export's codec)."""
