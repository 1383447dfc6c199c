"""Model families: one module per family, each listed in `registry.BUILTIN_FAMILY_MODULES`."""
