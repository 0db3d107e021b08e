"""What goldclone sends out: the outbound URL policy and callbacks."""
