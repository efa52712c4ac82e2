#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    semel_consumer::fuzzing::fetched_records(data);
});
