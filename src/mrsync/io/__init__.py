"""The thin I/O layer around the sans-I/O engine: UDP sockets, the receiver's file store
(temp files, verify, rename, metadata), reading the source, the event loop."""
