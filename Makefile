.PHONY: deps run test check

deps:
	scripts/install-deps

## Serve the API on its embedded defaults with the demo image, on port 12345.
run: deps
	.venv/bin/goldclone serve --demo

## The whole test suite, in a private network namespace.
test: deps
	scripts/test

## Formatting, lint and mypy --strict.
check: deps
	scripts/check
