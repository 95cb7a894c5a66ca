"""The conversion targets: the registry (``register_target``) and one file per family of built-in
targets (standard, batch_group, domain, proxy, stateful), with what builders share: ``transfer`` (moving
pretrained tensors, ``Transfer``) and ``groups`` (the default group count)."""
