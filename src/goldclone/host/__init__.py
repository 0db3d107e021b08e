"""Running and ending the host programs goldclone uses."""
