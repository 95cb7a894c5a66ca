"""Graph analyses of a model: tracing with leaf rules, norm sites, the meta shape probe, norm–activation
pairings, producing convs, shortcuts, functional norm calls, and instance forward rewrites."""
