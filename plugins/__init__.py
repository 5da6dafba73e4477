"""Built-in nnx_trainer plugins, loaded through the ``nnx_trainer`` entry-point group.

Each module holds one plugin class with a ``name`` class attribute equal to its
entry-point name, so passing a configured instance in ``Trainer(plugins=[...])``
replaces the default one.
"""
