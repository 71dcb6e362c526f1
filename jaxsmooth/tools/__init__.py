"""The tools built on the trainer: the `jaxsmooth` command line (`cli`), studies (`study`), audits of
trained and pretrained models (`audit`), weight conversion (`convert`) and the pretrained BERT reader
(`bert`). Nothing below `jaxsmooth.tools` imports from here."""
