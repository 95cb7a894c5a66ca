"""The architecture matrix shared by the conversion tests: 35 timm + 17 torchvision models.

Small variants and inputs chosen so one build + train step + eval of all of them takes a few
seconds on one CPU thread. Stochastic layers (dropout, drop path) are off so that train-mode
outputs are deterministic; norm statistics and affines are randomized by the tests.
"""
from __future__ import annotations

import timm
import torchvision
from torchvision.models import swin_transformer
from torchvision.models.detection import backbone_utils
from torchvision.ops.misc import FrozenBatchNorm2d


def _timm(name, **kw):
    return lambda: timm.create_model(name, pretrained=False, num_classes=10, **kw)


ARCHITECTURES = [
    ('timm_resnet10t', _timm('resnet10t'), 32),
    ('timm_efficientnet_b0', _timm('efficientnet_b0'), 32),
    ('timm_tf_efficientnet_lite0', _timm('tf_efficientnet_lite0'), 32),
    ('timm_mobilenetv3_small_050', _timm('mobilenetv3_small_050'), 32),
    ('timm_regnety_002', _timm('regnety_002'), 32),
    ('timm_densenet121', _timm('densenet121'), 32),
    ('timm_dla46_c', _timm('dla46_c'), 32),
    ('timm_hrnet_w18_small', _timm('hrnet_w18_small'), 32),
    ('timm_ghostnet_050', _timm('ghostnet_050', drop_rate=0.0), 32),
    ('timm_repvgg_a0', _timm('repvgg_a0'), 32),
    ('timm_rexnet_100', _timm('rexnet_100', drop_rate=0.0), 32),
    ('timm_dpn48b', _timm('dpn48b'), 32),
    ('timm_inception_v3', _timm('inception_v3'), 75),
    ('timm_xception41', _timm('xception41'), 32),
    ('timm_cs3darknet_s', _timm('cs3darknet_s'), 32),
    ('timm_res2net50_26w_4s', _timm('res2net50_26w_4s', layers=[1, 1, 1, 1]), 32),
    ('timm_resnest14d', _timm('resnest14d'), 32),
    ('timm_mobilevit_xxs', _timm('mobilevit_xxs'), 32),
    ('timm_mobilevitv2_050', _timm('mobilevitv2_050'), 32),
    ('timm_efficientformer_l1', _timm('efficientformer_l1', depths=(1, 1, 1, 1)), 224),
    ('timm_efficientformerv2_s0', _timm('efficientformerv2_s0', img_size=64), 64),
    ('timm_levit_128s', _timm('levit_128s', img_size=64), 64),
    ('timm_fastvit_t8', _timm('fastvit_t8'), 32),
    ('timm_convnext_atto', _timm('convnext_atto'), 32),
    ('timm_convnextv2_atto', _timm('convnextv2_atto'), 32),
    ('timm_vit_tiny', _timm('vit_tiny_patch16_224', img_size=64, depth=2), 64),
    ('timm_test_efficientnet_gn', _timm('test_efficientnet_gn'), 32),
    ('timm_test_efficientnet_ln', _timm('test_efficientnet_ln'), 32),
    ('timm_test_efficientnet_evos', _timm('test_efficientnet_evos'), 32),
    ('timm_resnetv2_50d_frn', _timm('resnetv2_50d_frn', layers=[1, 1, 1, 1]), 32),
    ('timm_resnet50_gn', _timm('resnet50_gn', layers=[1, 1, 1, 1]), 32),
    ('timm_convnext_zepto_rms', _timm('convnext_zepto_rms'), 32),
    ('timm_tiny_vit_5m', _timm('tiny_vit_5m_224'), 32),
    ('timm_efficientvit_m0', _timm('efficientvit_m0'), 32),
    ('timm_test_nfnet', _timm('test_nfnet'), 32),
    ('tv_resnet18', lambda: torchvision.models.resnet18(weights=None, num_classes=10),
     32),
    ('tv_mobilenet_v2', lambda: torchvision.models.mobilenet_v2(weights=None, num_classes=10, width_mult=0.35, dropout=0.0),
     32),
    ('tv_mobilenet_v3_small', lambda: torchvision.models.mobilenet_v3_small(weights=None, num_classes=10, dropout=0.0),
     32),
    ('tv_efficientnet_b0', lambda: torchvision.models.efficientnet_b0(weights=None, num_classes=10, stochastic_depth_prob=0.0, dropout=0.0),
     32),
    ('tv_regnet_y_400mf', lambda: torchvision.models.regnet_y_400mf(weights=None, num_classes=10),
     32),
    ('tv_densenet121', lambda: torchvision.models.densenet121(weights=None, num_classes=10),
     32),
    ('tv_shufflenet_v2_x0_5', lambda: torchvision.models.shufflenet_v2_x0_5(weights=None, num_classes=10),
     32),
    ('tv_mnasnet0_5', lambda: torchvision.models.mnasnet0_5(weights=None, num_classes=10, dropout=0.0),
     32),
    ('tv_googlenet', lambda: torchvision.models.googlenet(weights=None, num_classes=10, aux_logits=False, init_weights=False, dropout=0.0),
     32),
    ('tv_inception_v3', lambda: torchvision.models.inception_v3(weights=None, num_classes=10, aux_logits=False, init_weights=False, dropout=0.0),
     75),
    ('tv_convnext_tiny', lambda: torchvision.models.convnext_tiny(weights=None, num_classes=10, stochastic_depth_prob=0.0),
     32),
    ('tv_swin_t', lambda: swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24], window_size=[7, 7], stochastic_depth_prob=0.0, num_classes=10),
     32),
    ('tv_fpn_resnet18_frozen', lambda: backbone_utils.resnet_fpn_backbone(backbone_name='resnet18', weights=None, norm_layer=FrozenBatchNorm2d, trainable_layers=5),
     32),
    ('tv_vit_tiny_cfg', lambda: torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64, num_classes=10),
     32),
    ('tv_maxvit_tiny_cfg', lambda: torchvision.models.maxvit.MaxVit(input_size=(64, 64), stem_channels=16, partition_size=2, block_channels=[16, 32], block_layers=[1, 1], head_dim=8, stochastic_depth_prob=0.0, num_classes=10),
     64),
    ('tv_swin_v2_tiny_cfg', lambda: swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=[4, 4], stochastic_depth_prob=0.0, num_classes=10, block=swin_transformer.SwinTransformerBlockV2, downsample_layer=swin_transformer.PatchMergingV2),
     32),
    ('tv_googlenet_aux', lambda: torchvision.models.googlenet(weights=None, num_classes=10, aux_logits=True, init_weights=False, dropout=0.0, dropout_aux=0.0),
     32),
]
