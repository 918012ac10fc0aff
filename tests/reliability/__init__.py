"""tests/reliability is a package so that its modules never shadow another folder's of the same name."""
