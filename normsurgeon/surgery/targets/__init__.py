"""The conversion targets: the registry (``register_target``) and one file per family of built-in
targets (standard, batch_group, domain, proxy, stateful)."""
