# Corpus → train/val documents → tokenizer + Arrow shards. Their logs follow the data folders
# (results/logs/data/<corpus>[/<tokenizer>]), so building another corpus keeps the earlier one's.


rule corpus:
    input:
        CORPUS_FILES,
    output:
        train=f"{DATA_DIR}/corpus/train.jsonl",
        val=f"{DATA_DIR}/corpus/val.jsonl",
        stats=f"{DATA_DIR}/corpus/corpus.json",
    params:
        cfg=config_block_json("corpus"),
        out_dir=f"{DATA_DIR}/corpus",
    log:
        f"results/logs/{DATA_DIR.removeprefix('results/')}/corpus.log",
    resources:
        mem_mb=1000,
        runtime=30,
        cpus_per_task=1,
    conda:
        ENV
    shell:
        "python -m lipflow.data.corpus --config-json {params.cfg:q} --out-dir {params.out_dir} > {log} 2>&1"


rule tokenize:
    input:
        train=rules.corpus.output.train,
        val=rules.corpus.output.val,
        tokenizer_file=TOKENIZER_FILES,
    output:
        manifest=f"{TOKENS_DIR}/manifest.json",
        tokenizer=f"{TOKENS_DIR}/tokenizer.json",
    params:
        cfg=config_block_json("tokenizer"),
        corpus_dir=f"{DATA_DIR}/corpus",
        out_dir=TOKENS_DIR,
    log:
        f"results/logs/{TOKENS_DIR.removeprefix('results/')}/tokenize.log",
    threads: 2
    resources:
        mem_mb=2000,
        runtime=60,
        cpus_per_task=2,
    conda:
        ENV
    shell:
        "python -m lipflow.data.tokenize --corpus-dir {params.corpus_dir} --config-json {params.cfg:q}"
        " --out-dir {params.out_dir} > {log} 2>&1"
