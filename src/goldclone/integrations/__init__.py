"""goldclone in the CI systems people already run: GitLab Runner's custom executor
(``gitlab``) and Buildbot's latent worker (``buildbot``)."""
