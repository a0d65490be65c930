//! The batch response splitter, for every format and operation, on arbitrary bulk answers.
//!
//! Input: one byte choosing how many calls were batched (1-4) and whether they carry ids, then
//! the vendor's bulk answer. Whatever the answer, `split` gives one slot per call, in call order,
//! or an error (every caller then gets the bulk answer as it came).
#![no_main]

use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use serde_json::json;
use sluice::batch::format::{BatchOp, Item};
use sluice::batch::FORMATS;

fuzz_target!(|data: &[u8]| {
    let Some((&shape, body)) = data.split_first() else { return };
    let count = usize::from(shape % 4) + 1;
    let with_ids = shape & 0x10 != 0;
    let items: Vec<Item> = (0..count)
        .map(|at| Item {
            id: with_ids.then(|| format!("{}", 100 + at)),
            body: json!({"properties": {"email": format!("user{at}@example.com")}}),
            trace: format!("trace-{at}"),
        })
        .collect();
    for format in FORMATS {
        for op in [BatchOp::Create, BatchOp::Read, BatchOp::Update, BatchOp::Archive] {
            for status in [StatusCode::OK, StatusCode::CREATED, StatusCode::MULTI_STATUS, StatusCode::NO_CONTENT] {
                let _ = format.splittable(op, status);
            }
            if let Ok(answers) = format.split(op, body, &items) {
                assert_eq!(answers.len(), items.len(), "{} {op:?}: one answer per call", format.name());
            }
        }
    }
});
