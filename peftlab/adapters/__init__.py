"""Weight adapters: one file per method; importing this package registers them all."""
from peftlab.adapters.base import (ALL_LINEAR, METHODS, Adapter, AdapterConfig, AdapterConfigError, AdapterLayer,
                                   config_from_dict, method_class)
from peftlab.adapters.ether import EtherConfig, EtherPlusConfig, EtherPlusHHConfig
from peftlab.adapters.lora import LoraAdapter, LoraConfig

__all__ = ["ALL_LINEAR", "METHODS", "Adapter", "AdapterConfig", "AdapterConfigError", "AdapterLayer", "EtherConfig",
           "EtherPlusConfig", "EtherPlusHHConfig",
           "LoraAdapter", "LoraConfig", "config_from_dict", "method_class"]
