"""Widgets generated from the option schema: sections (Folders, SourceModel, BasicTraining, AdvancedTraining,
Network, SampleImages, Metadata), AccelerateLaunch, and the TrainingForm that collects them into one values dict."""
from .accelerate_launch import AccelerateLaunch
from .sections import (AdvancedTraining, BasicTraining, Folders, Metadata, Network, SampleImages, SchemaSection,
                       SourceModel)

__all__ = ["AccelerateLaunch", "AdvancedTraining", "BasicTraining", "Folders", "Metadata", "Network", "SampleImages",
           "SchemaSection", "SourceModel"]
