"""The hooks a dinocli plugin implements.

A plugin is a module named by an entry point in the group ``dinocli``::

    [project.entry-points.dinocli]
    my-plugin = "my_package.dinocli_plugin"

The module implements any of the hooks below with ``@dinocli.hookimpl``. Each hook receives a
``register`` callback; call it once per thing the plugin provides. dinocli owns everything else:
collection, duplicate detection, validation and error isolation (a plugin that fails is reported
and the rest keeps working). dinocli's own built-ins are registered exactly this way.

Every factory is called with keyword arguments and must accept (and may ignore) ones it does not
use, so that new options never break old plugins (``def build(**kwargs)``).

A plugin that provides many names at once (every model of a library) registers a pattern: a
prefix and one ``*``, with a callable that lists the names, e.g.
``register("timm/*", build, names=timm.list_models)``. ``names`` is called only when a name with
that prefix is looked up, completed or counted (``dino plugins --expand``), so a plugin that
imports its library inside ``names`` and ``build`` costs nothing at start-up. The factory is called
with the part after the prefix first: ``build("vit_small_patch16_224", **kwargs)``. A plain name
wins over a pattern; an unknown name with the prefix gets the usual error with the closest names.
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "dinocli"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


@hookspec
def dinocli_register_backbones(register: Register) -> None:
    """Register backbones: ``register(name, factory, description="")``.

    ``factory(**kwargs)`` returns a :class:`torch.nn.Module` that satisfies
    :class:`dinocli.interfaces.Backbone`: ``forward(x)`` maps a normalised image batch
    ``[B, 3, H, W]`` to embeddings ``[B, embed_dim]``, and the module has the attributes
    ``embed_dim`` (int), ``patch_size`` (int, or ``None`` for a CNN) and ``supports_attention``
    (bool; when true it also has ``get_last_selfattention(x) -> [B, heads, 1+N, 1+N]``).

    Keyword arguments dinocli passes when it has them: ``patch_size``, ``drop_path_rate``,
    ``img_size`` (the training crop size), ``patch_embed`` (``linear`` or ``conv``), ``pool``
    (``cls`` or ``avg``: the CLS token or the mean patch token as the embedding) and, only when a
    run asks for one (``--depth N``, N > 0), ``depth`` (transformer blocks); backbones without
    patches ignore the last three. A factory must accept ``**kwargs``.
    """


@hookspec
def dinocli_register_augmentations(register: Register) -> None:
    """Register multi-crop augmentation pipelines: ``register(name, factory, description="")``.

    ``factory(**kwargs)`` returns an object satisfying :class:`dinocli.interfaces.Augmentation`:
    called with a PIL RGB image and a :class:`torch.Generator` (the only source of randomness it
    may use, so that runs are reproducible and independent of the number of workers), it returns
    the list of crops as float tensors ``[3, h, w]``, the ``n_global`` global crops first, then
    the local crops. It has the attributes ``n_global`` and ``n_local``.

    Keyword arguments dinocli passes: ``global_crops_scale`` and ``local_crops_scale`` (pairs),
    ``local_crops_number``, ``global_crop_size``, ``local_crop_size``.
    """


@hookspec
def dinocli_register_collapse_strategies(register: Register) -> None:
    """Register collapse-avoidance strategies: ``register(name, factory, description="")``.

    ``factory(**kwargs)`` returns a :class:`dinocli.interfaces.CollapseStrategy` (an
    :class:`torch.nn.Module` whose buffers are its checkpointed state). A strategy either turns
    teacher logits into target probabilities (``provides_targets = True``, e.g. centering +
    sharpening, Sinkhorn-Knopp) or only adds a regulariser to the loss (e.g. KoLeo), or both.

    Keyword arguments dinocli passes: ``out_dim``, ``n_global`` (teacher views), ``n_crops``
    (student views), ``student_temp``.
    """


@hookspec
def dinocli_register_recipes(register: Register) -> None:
    """Register recipes, named sets of ``dino pretrain`` defaults: ``register(name, factory, description="")``.

    ``factory(**kwargs)`` returns a mapping from option names of :class:`dinocli.train.PretrainConfig`
    (e.g. ``"out_dim"``) to values, or to ``(value, reason)`` pairs; reasons are printed before
    training. A user picks a recipe with ``--recipe NAME``; options given in a config file or on the
    command line override the recipe's values.

    Keyword arguments dinocli passes: ``n_images`` (images found under ``--data``), ``image_size``
    (median shorter side of a sample of them, in pixels), both ``None`` when ``--data`` is not an
    existing folder, and ``epochs`` (the ``--epochs`` the user gave, or ``None``).
    """


@hookspec
def dinocli_register_loggers(register: Register) -> None:
    """Register loggers (metrics sinks): ``register(name, factory, description="")``.

    ``factory(**kwargs)`` returns a :class:`dinocli.interfaces.Logger`. A user picks loggers with
    ``--logger jsonl,NAME``; only the main process creates them. Keyword arguments dinocli passes:
    ``output`` (the run folder, a :class:`pathlib.Path`; write there unless the user configured
    elsewhere), ``run_name`` (the folder's name) and ``config`` (the run's options, plain values).
    A factory whose library is missing raises :class:`dinocli.UsageError` naming what to install;
    a logger that raises while logging is reported once and dropped, and training goes on.
    """
