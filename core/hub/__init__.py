"""Getting models from the Hugging Face Hub: search it for what Sol can run, check that a model fits this
machine, download it into the shared Hugging Face cache.

huggingface_hub does every request (search, file lists, downloads, the cache's layout, HF_TOKEN, HF_ENDPOINT,
HF_HUB_OFFLINE); Sol adds what it knows: which families and GGUF types load (core/formats), how much memory
a model needs (core/model), and a sha256 check of each weight file against the repository's LFS metadata.

- client.py: the one HfApi, and the library's errors as one line each
- catalog.py: a repository as Sol sees it (format, parameters, files, quantizations, loadable or why not)
- fit.py: memory and disk a model needs, and what this machine has free
- download.py: `get`: the files a model needs, resumable, verified, then named as `sol models list` names it
"""
