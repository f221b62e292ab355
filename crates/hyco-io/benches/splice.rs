//! The relay's frame-level splice and the client stream, in memory (tokio duplex pipes): how
//! fast frames go through when no network and no TLS is involved.
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use hyco_io::splice::{splice, Counters, SpliceConfig};
use hyco_io::ws::frame::apply_mask;
use hyco_io::ws::{Role, WsConfig, WsStream};
use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

const TOTAL: usize = 64 << 20;

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut g = c.benchmark_group("data path");
    g.throughput(Throughput::Bytes(TOTAL as u64));
    g.sample_size(10);
    g.bench_function("splice 64 MiB in 64 KiB frames", |b| {
        b.to_async(&rt).iter(|| async {
            let (ca, ra) = duplex(256 * 1024);
            let (cb, rb) = duplex(256 * 1024);
            let relay = tokio::spawn(async move {
                splice(ra, rb, SpliceConfig::default(), &Counters::default()).await
            });
            let mut a = WsStream::new(ca, Role::Client, WsConfig::default());
            let mut bs = WsStream::new(cb, Role::Client, WsConfig::default());
            let writer = tokio::spawn(async move {
                let chunk = vec![7u8; 64 * 1024];
                for _ in 0..TOTAL / chunk.len() {
                    a.write_all(&chunk).await.expect("write");
                }
                a.shutdown().await.expect("shutdown");
                let mut rest = Vec::new();
                let _ = a.read_to_end(&mut rest).await;
            });
            let mut buf = vec![0u8; 256 * 1024];
            let mut got = 0;
            loop {
                let n = bs.read(&mut buf).await.expect("read");
                if n == 0 {
                    break;
                }
                got += n;
            }
            assert_eq!(got, TOTAL);
            bs.shutdown().await.expect("shutdown");
            writer.await.expect("writer");
            relay.await.expect("relay");
        })
    });
    g.finish();
    let mut g = c.benchmark_group("mask");
    let mut buf = vec![1u8; 64 * 1024];
    g.throughput(Throughput::Bytes(buf.len() as u64));
    g.bench_function("apply_mask 64 KiB", |b| {
        b.iter(|| apply_mask(&mut buf, [1, 2, 3, 4], 1))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
