"""Quality labs: problems a CPU can solve exactly (gmm) or learn in minutes (digits), on which
Distillation++ is measured through the public Sampler. Run ``python -m distpp.lab gmm|digits --help``."""
