"""Starting receivers (local processes now, remote shells later) and the --server side."""
