"""NeMo's own code on our commands (issue 10, (a), (b), (g)): needs NeMo 2.0.0rc1 (the container-version env).

(a) every generated ``megatron_gpt_pretraining.py`` command (commands.sh and dapt.sbatch, every profile) goes
    through the script's own ``hydra_runner`` (``--cfg job``), and the composed config holds what we meant;
(b) NeMo's LR scheduler, built from that composed config as ``ModelPT.setup_optimization`` builds it, gives the
    linear warmup and then exactly the ChipNeMo learning rate at every step up to max_steps;
(g) the HF -> .nemo and .nemo -> HF command lines are accepted by the converters' own argument parsers, and the
    model config the HF -> .nemo converter writes agrees with the architecture our command line sets (with
    ``restore_from_path`` the command line's ``model`` config replaces the .nemo's whole config).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from nemo_fixtures import (
    ALL_PROFILES,
    HOSTILE_PATH_PART,
    SHARED_NEMO,
    planned_and_composed,
    profile_case,
    require_nemo,
)

from dapt.nemo_launch.commands import CONF_DIR, CONF_NAME, sequence_parallel, tokenizer_file


def _cfg(found: dict, profile: str, variant: str) -> dict:
    composed = found["composed"][profile][variant]
    assert "config" in composed, composed
    return composed["config"]


@pytest.mark.parametrize("variant", ["commands", "slurm"])
@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_a_composed_config_holds_what_we_meant(request, profile, variant) -> None:
    plan, found = profile_case(request, profile)
    cfg = _cfg(found, profile, variant)
    s, p, arch, layout = plan.settings, plan.settings.profile, plan.inputs.arch, plan.layout
    trainer, model, exp = cfg["trainer"], cfg["model"], cfg["exp_manager"]
    assert (trainer["devices"], trainer["num_nodes"], str(trainer["precision"])) == (
        p.gpus_per_node, p.num_nodes, s.precision)
    assert (trainer["max_steps"], trainer["val_check_interval"], trainer["limit_val_batches"]) == (
        s.max_steps, s.val_check_interval, s.limit_val_batches)
    parallel = {k: model[k] for k in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                                      "sequence_parallel", "micro_batch_size", "global_batch_size",
                                      "megatron_amp_O2", "seed")}
    assert parallel == {"tensor_model_parallel_size": p.tensor_parallel,
                        "pipeline_model_parallel_size": p.pipeline_parallel, "sequence_parallel": sequence_parallel(s),
                        "micro_batch_size": s.micro_batch_size, "global_batch_size": s.global_batch_size,
                        "megatron_amp_O2": s.precision == "bf16-mixed", "seed": s.seed}
    architecture = {k: model[k] for k in ("encoder_seq_length", "max_position_embeddings", "num_layers",
                                          "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                          "num_query_groups", "rotary_base")}
    assert architecture == {"encoder_seq_length": p.seq_length,
                            "max_position_embeddings": arch["max_position_embeddings"],
                            "num_layers": arch["num_hidden_layers"], "hidden_size": arch["hidden_size"],
                            "ffn_hidden_size": arch["intermediate_size"],
                            "num_attention_heads": arch["num_attention_heads"],
                            "num_query_groups": arch["num_key_value_heads"], "rotary_base": arch["rope_theta"]}
    assert model["data"]["seq_length"] == p.seq_length and model["layernorm_epsilon"] == arch["rms_norm_eps"]
    assert model["tokenizer"]["library"] == "sentencepiece"
    assert model["tokenizer"]["model"] == str(tokenizer_file(s.tokenizer))
    assert model["restore_from_path"] == str(layout.converted)
    blend = {split: [float(x) if i % 2 == 0 else x for i, x in enumerate(parts)]
             for split, parts in plan.blend.items()}
    assert model["data"]["data_prefix"] == blend and model["data"]["index_mapping_dir"] == str(layout.index_mapping)
    share = s.general_share
    assert blend["train"][0::2] == [1 - share, share] and blend["train"][1].startswith(str(s.domain_data))
    optim = model["optim"]
    assert (optim["lr"], optim["weight_decay"], optim["betas"]) == (
        p.learning_rate, p.weight_decay, [p.adam_beta1, p.adam_beta2])
    assert optim["sched"] == {"name": "CosineAnnealing", "warmup_steps": s.warmup_steps, "constant_steps": 0,
                              "min_lr": p.learning_rate}
    params = exp["checkpoint_callback_params"]
    assert (exp["explicit_log_dir"], exp["name"], exp["resume_if_exists"], exp["resume_ignore_no_checkpoint"]) == (
        str(layout.log_dir), s.run_name, True, True)
    assert (params["save_top_k"], params["save_last"], params["save_nemo_on_train_end"], params["always_save_nemo"],
            params["model_parallel_size"]) == (s.save_top_k, True, True, False, p.tensor_parallel * p.pipeline_parallel)
    assert exp.get("max_time_per_run") == (s.max_time_per_run if variant == "slurm" else None)


def test_a_plus_keys_are_exactly_those_the_yaml_lacks(request) -> None:
    """``key=value`` for keys NeMo's YAML has (Hydra refuses others), ``++key=value`` only for the ones it lacks."""
    plan, found = profile_case(request, "tiny")
    from omegaconf import OmegaConf

    yaml = OmegaConf.to_container(OmegaConf.load(SHARED_NEMO / CONF_DIR / f"{CONF_NAME}.yaml"), resolve=False)

    def in_yaml(key: str) -> bool:
        node = yaml
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return False
            node = node[part]
        return True

    for override in plan.pretrain_slurm[3:]:
        key = override.split("=", 1)[0]
        assert in_yaml(key.lstrip("+")) != key.startswith("++"), override
    assert "no_such_key" in found["unknown_key"].get("error", ""), found["unknown_key"]  # composition is strict


def test_a_paths_with_shell_and_hydra_syntax_compose_exactly(request) -> None:
    found = planned_and_composed(request)
    layout = found["hostile_plan"].layout
    assert HOSTILE_PATH_PART in str(layout.run_dir)
    cfg = found["hostile"]["config"]
    assert (cfg["exp_manager"]["explicit_log_dir"], cfg["model"]["restore_from_path"],
            cfg["model"]["data"]["index_mapping_dir"]) == (str(layout.log_dir), str(layout.converted),
                                                            str(layout.index_mapping))


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_b_nemo_scheduler_warms_up_then_holds_the_chipnemo_rate(request, profile) -> None:
    plan, found = profile_case(request, profile)
    import torch
    from nemo.core.optim.lr_scheduler import prepare_lr_scheduler

    cfg = _cfg(found, profile, "commands")
    optim = dict(cfg["model"]["optim"])
    sched = {**optim.pop("sched"), "max_steps": cfg["trainer"]["max_steps"]}  # as ModelPT.setup_optimization
    weight = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([weight], lr=optim["lr"], betas=tuple(optim["betas"]),
                                  weight_decay=optim["weight_decay"])
    scheduler = prepare_lr_scheduler(optimizer, sched, train_dataloader=None)["scheduler"]
    rates = []
    for _ in range(plan.settings.max_steps):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    lr, warmup = plan.settings.profile.learning_rate, plan.settings.warmup_steps
    ramp = [lr * (step + 1) / (warmup + 1) for step in range(warmup)]
    assert rates[:warmup] == pytest.approx(ramp, rel=1e-12) and all(a < b for a, b in zip(rates, rates[1:warmup]))
    assert rates[warmup:] == [lr] * (plan.settings.max_steps - warmup)  # exactly, every step to max_steps


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_g_converters_accept_our_command_lines(request, profile) -> None:
    plan, found = profile_case(request, profile)
    args = found["converter_args"][profile]["args"]
    assert (args["input_name_or_path"], args["output_path"], args["precision"]) == (
        str(plan.settings.hf_model), str(plan.layout.converting), "bf16")
    assert Path(args["hparams_file"]).resolve() == (SHARED_NEMO / CONF_DIR / f"{CONF_NAME}.yaml").resolve()
    export = found["export_commands"][profile]["argv"]
    parsed = found["export_args"][profile]["args"]
    assert (parsed["input_name_or_path"], parsed["output_path"], parsed["precision"], parsed["cpu_only"]) == (
        export[1], export[3], "bf16", True)
    assert parsed["input_name_or_path"] == str(plan.trained_nemo)
    assert found["misspelled"].get("exit") == 2 and "--input_name_or_path" in found["misspelled"]["error"]


@pytest.mark.parametrize("profile", ALL_PROFILES)
def test_g_converted_model_config_agrees_with_our_command_line(request, profile) -> None:
    """The .nemo's config comes from the converter's load_config; at restore our ``model`` config replaces it,
    so every key the converter derives from config.json must be what our command line says."""
    plan, found = profile_case(request, profile)
    converter = found["converter_config"][profile]["config"]
    ours = _cfg(found, profile, "commands")["model"]
    keys = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
            "max_position_embeddings", "init_method_std", "layernorm_epsilon", "rotary_base", "activation",
            "make_vocab_size_divisible_by", "normalization", "bias", "position_embedding_type",
            "share_embeddings_and_output_weights", "mcore_gpt", "transformer_engine")
    assert {k: ours[k] for k in keys} == {k: converter[k] for k in keys}
    assert converter.get("seq_len_interpolation_factor") is None  # no RoPE scaling in Llama 2
    assert ours["encoder_seq_length"] <= converter["encoder_seq_length"]  # trained up to the model's length
    from dapt.artifacts import file_sha256

    assert file_sha256(converter["tokenizer"]["model"]) == file_sha256(ours["tokenizer"]["model"])


def test_environment_has_the_containers_nemo() -> None:
    require_nemo()
    from importlib.metadata import version

    assert version("nemo_toolkit") == "2.0.0rc1" and version("megatron-core") == "0.8.0"
