from model_tester import ModelTester


class TestUNetBaseline(ModelTester):
    config_name = "unet_baseline"
    expected_params = 12.4e6  # Brügger et al. 2019, sec. 2.2
    tiny = ("model.channels=[4,8,16]", "model.norm_groups=2")
