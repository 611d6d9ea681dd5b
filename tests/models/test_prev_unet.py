from model_tester import ReversibleModelTester


class TestPartiallyReversibleUNet(ReversibleModelTester):
    config_name = "prev_unet"
    expected_params = 12.37e6  # Brügger et al. 2019
    tiny = ("model.channels=[8,16,24]", "model.norm_groups=2")
    tiny_shape = (8, 8, 8)
    chunked = ("model.chunks=3",)  # 3 slabs of the 8 slices at the top, 2 of 2 at the bottom
    checkpointable = True
