"""The demo and test guest: a tiny real Linux VM built from the host's kernel and busybox."""
