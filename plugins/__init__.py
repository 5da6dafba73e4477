"""Built-in nnx_trainer plugins, loaded through the ``nnx_trainer`` entry-point group.

The repository folder is ``plugins/``; the installed import name is
``nnx_trainer_plugins`` (pyproject maps one to the other), so a user's own
``plugins`` package never collides with ours.

Each module holds one plugin class with a ``name`` class attribute equal to its
entry-point name, so passing a configured instance in ``Trainer(plugins=[...])``
replaces the default one.
"""
