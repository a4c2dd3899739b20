"""The option schema: argparse, --config_file TOML and the run TOML all come from it and agree."""
import pytest

from sd_scripts import options


def test_every_option_round_trips_through_argparse_and_toml(tmp_path):
    parser_values = {}
    argv = []
    for opt in options.options_for("network"):
        if opt.name == "network_train_text_encoder_only" or opt.refused:
            continue  # excludes network_train_unet_only, tested below; refused ones: tests/test_compat_options.py
        if opt.type is bool:
            argv.append(opt.flag)
            parser_values[opt.name] = True
        elif opt.nargs:
            argv += [opt.flag, "a=1", "b=2"]
            parser_values[opt.name] = ["a=1", "b=2"]
        elif opt.choices:
            value = ([c for c in opt.choices if c is not None and c != opt.default] or [opt.default])[0]
            argv += [opt.flag, str(value)]
            parser_values[opt.name] = value
        elif opt.name == "resolution":
            argv += [opt.flag, "640,448"]
            parser_values[opt.name] = "640,448"
        elif opt.name == "face_crop_aug_range":
            argv += [opt.flag, "2.0,4.0"]
            parser_values[opt.name] = "2.0,4.0"
        elif opt.type is str:
            argv += [opt.flag, "some value; $(x) `y`"]
            parser_values[opt.name] = "some value; $(x) `y`"
        else:
            text = "0.5" if opt.maximum is not None and opt.maximum <= 1 else str(max(3, int(opt.minimum or 0) * 2))
            argv += [opt.flag, text]
            parser_values[opt.name] = opt.type(text)
    from_cli = vars(options.parse_args("network", argv))
    for name, value in parser_values.items():
        assert from_cli[name] == value, name
    toml_file = tmp_path / "run.toml"
    toml_file.write_text(options.dump_toml(from_cli, "network"))
    from_toml = vars(options.parse_args("network", ["--config_file", str(toml_file)]))
    for name, value in parser_values.items():
        assert from_toml[name] == value, name


def test_command_line_wins_over_config_file(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[training]\nmax_train_steps = 10\nlearning_rate = 0.5\n[x]\nnetwork_dim = 16\n')
    ns = options.parse_args("network", ["--config_file", str(cfg), "--max_train_steps", "20"])
    assert (ns.max_train_steps, ns.learning_rate, ns.network_dim) == (20, 0.5, 16)


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("[training]\nlearning_rte = 1e-4\n")
    with pytest.raises(options.OptionError, match="learning_rte"):
        options.parse_args("network", ["--config_file", str(cfg)])


def test_unknown_flag_and_bad_values_are_errors():
    with pytest.raises(options.OptionError, match="--not_an_option"):
        options.parse_args("network", ["--not_an_option", "1"])
    with pytest.raises(options.OptionError, match="network_dim"):
        options.parse_args("network", ["--network_dim", "0"])
    with pytest.raises(options.OptionError, match="resolution"):
        options.parse_args("network", ["--resolution", "12,abc"])


def test_sd_scripts_spellings_are_accepted():
    ns = options.parse_args("network", ["--caption_extention", ".txt", "--lr_warmup_steps", "0.05"])
    assert ns.caption_extension == ".txt" and ns.lr_warmup_steps == 0.05
    ns = options.parse_args("network", ["--lr_warmup_steps", "100"])
    assert ns.lr_warmup_steps == 100 and isinstance(ns.lr_warmup_steps, int)
