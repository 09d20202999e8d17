"""The finetune task (E7): tensor adapters (LoRA, FLoRA, LoRETTA) on a pretrained language model,
trained with Adam, SAM, DAS, ... through the HF Trainer (:mod:`tensorsam.integrations.hf`)."""
