"""ciwae's beta and renyi's alpha: one default in the library, the registry and the CLI."""

import inspect

import jaxelbo as je
from jaxelbo import registry


def test_library_registry_and_cli_defaults_agree():
    from jaxelbo.app.experiment import TrainSettings, objective_kwargs

    for name, key in (("ciwae", "beta"), ("renyi", "alpha"), ("rws", "alpha")):
        library = inspect.signature(getattr(je, name)).parameters[key].default
        assert library == registry.get(name).keywords[key], (name, key)
        cli = objective_kwargs(TrainSettings(objective=name, estimator="dreg", num_samples=8))[key]
        assert cli == library, (name, key, cli, library)
    assert inspect.signature(je.ciwae).parameters["beta"].default == 0.5
    assert inspect.signature(je.renyi).parameters["alpha"].default == 0.5
