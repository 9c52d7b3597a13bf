"""phi4mm: a fast, dependency-light runtime for Microsoft Phi-4-multimodal-instruct.

    import phi4mm
    model = phi4mm.load("/path/to/Phi-4-multimodal-instruct")
    print(model.generate("<|user|>Hello!<|end|><|assistant|>"))
"""
__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy: `import phi4mm` stays cheap (the CLI's --help, the tokenizer alone) until the model is used.
    if name in ("load", "Model"):
        from phi4mm import api
        return getattr(api, name)
    raise AttributeError(f"module 'phi4mm' has no attribute {name!r}")


__all__ = ["Model", "__version__", "load"]
