"""snaplab's lab: experiments, metrics, plots, widgets and the ``snaplab`` CLI."""
