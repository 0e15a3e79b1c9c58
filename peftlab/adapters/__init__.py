"""Weight adapters: one file per method; importing this package registers them all."""
from peftlab.adapters.base import (ALL_LINEAR, METHODS, Adapter, AdapterConfig, AdapterConfigError, AdapterLayer,
                                   config_from_dict, method_class)
from peftlab.adapters.blob import BlobConfig
from peftlab.adapters.bottleneck import BottleneckConfig
from peftlab.adapters.ether import EtherConfig, EtherPlusConfig, EtherPlusHHConfig
from peftlab.adapters.lora import LoraAdapter, LoraConfig
from peftlab.adapters.oft import OftConfig
from peftlab.adapters.vera import VeraConfig

__all__ = ["ALL_LINEAR", "METHODS", "Adapter", "AdapterConfig", "AdapterConfigError", "AdapterLayer",
           "BlobConfig", "BottleneckConfig", "EtherConfig", "EtherPlusConfig", "EtherPlusHHConfig", "LoraAdapter", "LoraConfig",
           "OftConfig", "VeraConfig", "config_from_dict", "method_class"]
