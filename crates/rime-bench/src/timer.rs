//! Timing of recorded dispatches: GPU timestamps written at the begin and end of one compute pass when the
//! adapter has TIMESTAMP_QUERY (lavapipe does, 1 ns per tick), else wall time from submit to the end of a
//! device sync. Warm-up runs first (pipeline compilation and Mesa's shader cache), then the median of the
//! timed runs; short passes repeat the dispatches inside one pass so that a run lasts a few milliseconds.

use std::time::Instant;

use rime_kernels::wgpu;
use rime_kernels::{Device, Dispatch};

use crate::{Error, Result};

/// Median and spread of timed runs, in seconds per repetition.
#[derive(Debug, Clone, Copy)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    pub runs: usize,
}

impl Stats {
    pub fn of(mut xs: Vec<f64>) -> Stats {
        xs.sort_by(|a, b| a.total_cmp(b));
        let n = xs.len();
        if n == 0 {
            return Stats { median: f64::NAN, min: f64::NAN, max: f64::NAN, runs: 0 };
        }
        let median = if n % 2 == 1 { xs[n / 2] } else { 0.5 * (xs[n / 2 - 1] + xs[n / 2]) };
        Stats { median, min: xs[0], max: xs[n - 1], runs: n }
    }
}

struct Queries {
    set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    staging: wgpu::Buffer,
    /// Nanoseconds per tick.
    period: f64,
}

/// Times passes on one device.
pub struct Timer<'d> {
    dev: &'d Device,
    queries: Option<Queries>,
}

/// A pass should last at least this long (dispatches are repeated inside it up to [`MAX_REPS`] times).
const TARGET_PASS_S: f64 = 0.02;
const MAX_REPS: usize = 64;

impl<'d> Timer<'d> {
    /// Timestamps when the device has them and `force_wall` is false.
    pub fn new(dev: &'d Device, force_wall: bool) -> Timer<'d> {
        let queries = (dev.has_timestamps() && !force_wall).then(|| {
            let d = dev.wgpu_device();
            let set = d.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("rime bench timestamps"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            });
            let resolve = d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("rime bench resolve"),
                size: 16,
                usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            });
            let staging = d.create_buffer(&wgpu::BufferDescriptor {
                label: Some("rime bench timestamp readback"),
                size: 16,
                usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            });
            Queries { set, resolve, staging, period: dev.queue().get_timestamp_period() as f64 }
        });
        Timer { dev, queries }
    }

    pub fn method(&self) -> &'static str {
        if self.queries.is_some() {
            "gpu-timestamps"
        } else {
            "wall+sync"
        }
    }

    pub fn has_timestamps(&self) -> bool {
        self.queries.is_some()
    }

    fn pass_desc(&self) -> wgpu::ComputePassDescriptor<'_> {
        wgpu::ComputePassDescriptor {
            label: Some("rime bench"),
            timestamp_writes: self.queries.as_ref().map(|q| wgpu::ComputePassTimestampWrites {
                query_set: &q.set,
                beginning_of_pass_write_index: Some(0),
                end_of_pass_write_index: Some(1),
            }),
        }
    }

    /// Seconds of one pass that records `ds` `reps` times (GPU time between the pass's timestamps, or wall
    /// time from submit to the end of the sync).
    pub fn time_pass(&self, ds: &[Dispatch], reps: usize) -> Result<f64> {
        let mut enc = self
            .dev
            .wgpu_device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("rime bench") });
        {
            let mut pass = enc.begin_compute_pass(&self.pass_desc());
            for _ in 0..reps.max(1) {
                for d in ds {
                    d.record(&mut pass);
                }
            }
        }
        if let Some(q) = &self.queries {
            enc.resolve_query_set(&q.set, 0..2, &q.resolve, 0);
            enc.copy_buffer_to_buffer(&q.resolve, 0, &q.staging, 0, 16);
        }
        let cmd = enc.finish();
        let t0 = Instant::now();
        self.dev.queue().submit([cmd]);
        self.dev.wait()?;
        let wall = t0.elapsed().as_secs_f64();
        match &self.queries {
            None => Ok(wall),
            Some(q) => Ok(self.read_ticks(q)? * q.period * 1e-9),
        }
    }

    fn read_ticks(&self, q: &Queries) -> Result<f64> {
        let bytes = self.dev.map_read(&q.staging)?;
        let tick = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[8 * i..8 * i + 8]);
            u64::from_le_bytes(b)
        };
        let (t0, t1) = (tick(0), tick(1));
        if t1 < t0 {
            return Err(Error::Msg(format!("timestamps went backwards ({t0} then {t1} ticks)")));
        }
        Ok((t1 - t0) as f64)
    }

    /// Warm up, pick the repetitions per pass, then the median over `runs` passes (per repetition).
    pub fn measure(&self, ds: &[Dispatch], warmup: usize, runs: usize) -> Result<Stats> {
        let mut one = f64::INFINITY;
        for _ in 0..warmup.max(1) {
            one = one.min(self.time_pass(ds, 1)?);
        }
        let reps = if one > 0.0 { ((TARGET_PASS_S / one).ceil() as usize).clamp(1, MAX_REPS) } else { MAX_REPS };
        let mut xs = Vec::with_capacity(runs);
        for _ in 0..runs.max(1) {
            xs.push(self.time_pass(ds, reps)? / reps as f64);
        }
        Ok(Stats::of(xs))
    }

    /// Write one timestamp pair around nothing: a marker whose end time is when the queue reached it.
    /// Used to bracket work recorded by someone else (the training step's own encoder). Returns the submit's
    /// marker; read it with [`Timer::read_marker_pair`] after a later marker.
    pub(crate) fn submit_marker(&self, set: &wgpu::QuerySet, index: u32) {
        let mut enc = self
            .dev
            .wgpu_device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("rime bench marker") });
        {
            let _pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("rime bench marker"),
                timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                    query_set: set,
                    beginning_of_pass_write_index: Some(index),
                    end_of_pass_write_index: None,
                }),
            });
        }
        self.dev.queue().submit([enc.finish()]);
    }

    /// Nanoseconds between markers 0 and 1 of `set` (resolve, copy, wait, read).
    pub(crate) fn read_marker_pair(&self, set: &wgpu::QuerySet) -> Result<Option<f64>> {
        let Some(q) = &self.queries else { return Ok(None) };
        let mut enc = self.dev.wgpu_device().create_command_encoder(&Default::default());
        enc.resolve_query_set(set, 0..2, &q.resolve, 0);
        enc.copy_buffer_to_buffer(&q.resolve, 0, &q.staging, 0, 16);
        self.dev.queue().submit([enc.finish()]);
        Ok(Some(self.read_ticks(q)? * q.period))
    }

    pub(crate) fn marker_set(&self) -> Option<wgpu::QuerySet> {
        self.queries.as_ref().map(|_| {
            self.dev.wgpu_device().create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("rime bench markers"),
                ty: wgpu::QueryType::Timestamp,
                count: 2,
            })
        })
    }
}

impl Timer<'_> {
    /// GPU seconds of each dispatch, run in order, each in its own timestamped pass (all in one submit per
    /// 2,048 dispatches, the query-set limit). `None` without timestamp queries: one dispatch is too short to
    /// time by wall clock. Splitting passes adds a little per dispatch, so the sum slightly exceeds a step.
    pub fn profile(&self, ds: &[&Dispatch]) -> Result<Option<Vec<f64>>> {
        let Some(q) = &self.queries else { return Ok(None) };
        let d = self.dev.wgpu_device();
        let mut out = Vec::with_capacity(ds.len());
        for chunk in ds.chunks((wgpu::QUERY_SET_MAX_QUERIES / 2) as usize) {
            let n = chunk.len() as u32;
            let set = d.create_query_set(&wgpu::QuerySetDescriptor {
                label: Some("rime bench profile"),
                ty: wgpu::QueryType::Timestamp,
                count: 2 * n,
            });
            let bytes = 16 * n as u64;
            let usage = [
                wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ];
            let [resolve, staging] = usage.map(|usage| {
                d.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("rime bench profile"),
                    size: bytes,
                    usage,
                    mapped_at_creation: false,
                })
            });
            let mut enc = d.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("rime profile") });
            for (i, disp) in chunk.iter().enumerate() {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("rime profile"),
                    timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                        query_set: &set,
                        beginning_of_pass_write_index: Some(2 * i as u32),
                        end_of_pass_write_index: Some(2 * i as u32 + 1),
                    }),
                });
                disp.record(&mut pass);
            }
            enc.resolve_query_set(&set, 0..2 * n, &resolve, 0);
            enc.copy_buffer_to_buffer(&resolve, 0, &staging, 0, bytes);
            self.dev.queue().submit([enc.finish()]);
            let raw = self.dev.map_read(&staging)?;
            let tick = |i: usize| u64::from_le_bytes(raw[8 * i..8 * i + 8].try_into().expect("8 bytes"));
            for i in 0..n as usize {
                let (t0, t1) = (tick(2 * i), tick(2 * i + 1));
                out.push(t1.saturating_sub(t0) as f64 * q.period * 1e-9);
            }
        }
        Ok(Some(out))
    }
}

/// Median wall time of a CPU closure (seconds), after `warmup` untimed calls.
pub fn measure_cpu(warmup: usize, runs: usize, mut f: impl FnMut()) -> Stats {
    for _ in 0..warmup {
        f();
    }
    let mut xs = Vec::with_capacity(runs);
    for _ in 0..runs.max(1) {
        let t0 = Instant::now();
        f();
        xs.push(t0.elapsed().as_secs_f64());
    }
    Stats::of(xs)
}
