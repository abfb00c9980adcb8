"""Hugging Face: models and tokenizers loaded through transformers (an optional extra, imported
only here), refused in one sentence unless every weight loaded; a model's weights written back as
a save_pretrained folder."""
import hashlib
from pathlib import Path

import torch

from shared import UserError


def from_hugging_face(class_name, name_or_path, **options):
    """transformers' class_name (AutoConfig, AutoTokenizer, a model class) from the Hugging Face
    hub by name, or from a folder written by save_pretrained; what goes wrong, in one sentence.
    transformers is an optional extra, imported only here."""
    try:
        import transformers
        from transformers.utils import logging
    except ImportError:
        raise UserError(f"{name_or_path!r} comes from Hugging Face: "
                        "pip install transformers") from None
    logging.disable_progress_bar()
    # its warnings (a weight it could not load, say) become our own errors, one sentence each
    logging.set_verbosity_error()
    load = getattr(transformers, class_name).from_pretrained
    if not Path(name_or_path).is_dir():
        try:
            # downloaded before: no network needed
            return load(name_or_path, local_files_only=True, **options)
        except (OSError, ValueError):
            pass
        endpoint = hub_endpoint_unreachable()
        if endpoint:
            raise UserError(f"could not load {name_or_path!r}: it is not a folder, not in the "
                            f"Hugging Face cache, and {endpoint} cannot be reached; download it "
                            "once on a network (it is then cached), or give a folder written by "
                            "save_pretrained") from None
    try:
        return load(name_or_path, **options)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not load {name_or_path!r}: it is not a folder written by "
                        "save_pretrained, and the Hugging Face hub did not provide it "
                        f"({reason})") from None


def hub_endpoint_unreachable():
    """The Hugging Face hub's address if it cannot be reached from here, asked once with a short
    timeout: offline, transformers would retry each file for half a minute before it gave up."""
    from huggingface_hub import constants, get_session
    try:
        get_session().head(constants.ENDPOINT, timeout=3)
    except Exception:
        return constants.ENDPOINT
    return None


def hub_dataset(name, config, instead):
    """The splits of a dataset of the Hugging Face hub, through the datasets package; what goes
    wrong in one sentence that ends with what to do instead. Offline, the hub is asked once with a
    short timeout (datasets would retry for half a minute)."""
    endpoint = hub_endpoint_unreachable()
    if endpoint:
        raise UserError(f"could not load {name} from the Hugging Face hub: {endpoint} cannot be "
                        f"reached from here; {instead}")
    try:
        from datasets import load_dataset
        from datasets.utils.logging import disable_progress_bar, set_verbosity_error
    except ImportError:
        raise UserError(f"loading {name} from the Hugging Face hub needs the datasets package "
                        f"(pip install datasets); {instead}") from None
    disable_progress_bar()
    set_verbosity_error()
    try:
        return load_dataset(name, config)
    except Exception as err:
        raise UserError(f"could not load {name} from the Hugging Face hub "
                        f"({type(err).__name__}); {instead}") from None


def pretrained_context(name_or_path):
    """The longest context, in tokens, that a pretrained model was trained for."""
    return from_hugging_face("AutoConfig", name_or_path).max_position_embeddings


def pretrained_model(name_or_path, model_types):
    """A causal language model from Hugging Face, refused in one sentence unless its config is of
    one of model_types and every one of its weights loaded. transformers builds any model from
    any config, fills each weight it does not find with random numbers, and only warns."""
    config = from_hugging_face("AutoConfig", name_or_path)
    if config.model_type not in model_types:
        raise UserError(f"{name_or_path!r} is a {config.model_type} model; this stage loads "
                        f"{' and '.join(model_types)} models")
    model, loading = from_hugging_face("AutoModelForCausalLM", name_or_path, config=config,
                                       output_loading_info=True, ignore_mismatched_sizes=True)
    problems = {"missing": loading["missing_keys"],
                "of no use": loading["unexpected_keys"],
                "of another shape": [name for name, *_ in loading["mismatched_keys"]]}
    found = [f"{len(names)} {what} (such as {sorted(names)[0]})"
             for what, names in problems.items() if names]
    if found:
        raise UserError(f"{name_or_path!r} does not hold the weights its config describes: "
                        f"{', '.join(found)}; it was altered, or saved from another model")
    return model.eval()


def export_pretrained(base, weights, tokenizer, folder):
    """A save_pretrained folder of the same kind as base's Llama or Qwen3 model (its config), with
    weights (by their Hugging Face names) in place of base's, and tokenizer (a Hugging Face one):
    a folder that transformers, and the tools that read its models, load."""
    model = pretrained_model(base, ["llama", "qwen3"])
    theirs = model.state_dict()
    with torch.no_grad():
        for name, tensor in weights.items():
            theirs[name].copy_(tensor)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def weights_digest(model):
    """The SHA-256 of a model's weights, names and bytes: any change to a weight changes it."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().cpu().contiguous().view(torch.uint8).numpy())
    return digest.hexdigest()
