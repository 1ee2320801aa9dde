"""Pure logic: no sockets, no files, no clock reads. Time is always passed in."""
