//! Parquet, read row group by row group in small batches (bounded memory whatever the file size)
//! with the `parquet` crate's Arrow reader. Each row becomes a [`Row`]: a JSON object of its
//! columns for the layout parsers, with binary values (the `bytes` of the `datasets` `Image()`
//! struct `{bytes: binary, path: string}`) moved to the row's blob table instead of the JSON
//! (see [`crate::row`]). Strings, numbers, booleans, structs, lists, maps and dictionaries are
//! converted; columns of other types (dates, decimals, …) read as null. A row's position:
//! `line` is its 1-based row number over the file, `row_group` and `row` (0-based) where it sits.

use super::{Body, Item, Reader};
use crate::error::{Error, Result};
use crate::record::Source;
use crate::row::{blob_marker, Row};
use arrow_array::cast::AsArray;
use arrow_array::types::*;
use arrow_array::{Array, RecordBatch};
use arrow_schema::{DataType, FieldRef, Schema};
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};
use bytes::{Buf, Bytes};
use parquet::file::reader::{ChunkReader, Length};
use serde_json::{Map, Value};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Rows decoded at a time (a batch holds their images: keep it small).
const BATCH_ROWS: usize = 32;

pub struct ParquetRows {
    file: File,
    path: PathBuf,
    label: String,
    meta: ArrowReaderMetadata,
    limit: usize,
    group: usize,
    reader: Option<ParquetRecordBatchReader>,
    /// Rows of the current batch not yet handed out, and where the batch starts in its group.
    batch: Option<(RecordBatch, usize)>,
    row_in_group: u64,
    row_before_group: u64,
    bytes: u64,
    file_len: u64,
    /// Row groups up to this size are read whole ([`ROW_GROUP_BYTES`]); how many were.
    whole_row_group: u64,
    groups_read_whole: u64,
}

fn perr(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Input { path: path.to_path_buf(), source: std::io::Error::other(format!("not a readable Parquet file: {e}")) }
}

impl ParquetRows {
    pub fn open(path: &Path, label: &str, limit: usize) -> Result<Self> {
        let (file, stat) = super::open_regular(path)?;
        let meta = ArrowReaderMetadata::load(&file, Default::default()).map_err(|e| perr(path, e))?;
        // Read byte columns as views into the decompressed pages instead of copying every value
        // (each embedded image) into a fresh offsets buffer; the values are the same.
        let views = Arc::new(Schema::new_with_metadata(meta.schema().fields().iter().map(|f| as_view(f)).collect::<Vec<_>>(), meta.schema().metadata().clone()));
        let meta = ArrowReaderMetadata::try_new(meta.metadata().clone(), ArrowReaderOptions::new().with_schema(views)).unwrap_or(meta);
        Ok(ParquetRows {
            file,
            path: path.to_path_buf(),
            label: label.to_string(),
            meta,
            limit,
            group: 0,
            reader: None,
            batch: None,
            row_in_group: 0,
            row_before_group: 0,
            bytes: 0,
            file_len: stat.len(),
            whole_row_group: ROW_GROUP_BYTES,
            groups_read_whole: 0,
        })
    }

    fn reader_of<T: ChunkReader + 'static>(&self, input: T) -> Result<ParquetRecordBatchReader> {
        ParquetRecordBatchReaderBuilder::new_with_metadata(input, self.meta.clone())
            .with_batch_size(BATCH_ROWS)
            .with_row_groups(vec![self.group])
            .build()
            .map_err(|e| perr(&self.path, e))
    }

    /// The next batch of the file, opening row groups in turn; `None` at the end.
    fn next_batch(&mut self) -> Result<Option<RecordBatch>> {
        loop {
            if let Some(r) = &mut self.reader {
                match r.next() {
                    Some(b) => return b.map(Some).map_err(|e| perr(&self.path, e)),
                    None => {
                        let md = self.meta.metadata();
                        self.bytes += md.row_group(self.group).compressed_size().max(0) as u64;
                        self.row_before_group += md.row_group(self.group).num_rows().max(0) as u64;
                        self.reader = None;
                        self.group += 1;
                        self.row_in_group = 0;
                    }
                }
            }
            if self.group >= self.meta.metadata().num_row_groups() {
                return Ok(None);
            }
            let r = match RowGroupBytes::read(&self.file, self.file_len, &self.meta, self.group, self.whole_row_group).map_err(|e| Error::input(&self.path, e))? {
                Some(bytes) => {
                    self.groups_read_whole += 1;
                    self.reader_of(bytes)
                }
                None => self.reader_of(self.file.try_clone().map_err(|e| Error::input(&self.path, e))?),
            };
            self.reader = Some(r?);
        }
    }
}

impl Reader for ParquetRows {
    fn next_chunk(&mut self, max: usize) -> Result<Vec<Item>> {
        let mut out = Vec::new();
        let mut held = 0usize;
        while out.len() < max && held < super::CHUNK_BYTES {
            let (batch, start) = match self.batch.take() {
                Some(b) => b,
                None => match self.next_batch()? {
                    Some(b) => (b, 0),
                    None => break,
                },
            };
            let mut i = start;
            while i < batch.num_rows() && out.len() < max && held < super::CHUNK_BYTES {
                let src = Source {
                    row_group: Some(self.group as u64),
                    row: Some(self.row_in_group),
                    ..Source::line(self.label.clone(), self.row_before_group + self.row_in_group + 1)
                };
                let row = row_of(&batch, i);
                let size = row.blobs.iter().map(Vec::len).sum::<usize>();
                held += size;
                let body = if size > self.limit { Body::TooLarge(size as u64) } else { Body::Row(row) };
                out.push(Item { src, body });
                self.row_in_group += 1;
                i += 1;
            }
            if i < batch.num_rows() {
                self.batch = Some((batch, i));
            }
        }
        Ok(out)
    }

    fn bytes_read(&self) -> u64 {
        self.bytes
    }
}

/// Largest row group read whole into memory by default (a larger one is read page by page from the file).
const ROW_GROUP_BYTES: u64 = 16 << 20;

/// A row group's column chunks, read with one `pread`. Given the `File`, the page reader makes
/// each page header and each page a read of its own (a `dup`, a seek and a read each, headers
/// through a fresh 8 KiB buffer); row groups as `datasets` writes them (100 rows) are small.
struct RowGroupBytes {
    start: u64,
    bytes: Bytes,
    file_len: u64,
}

impl RowGroupBytes {
    /// The row group's bytes, or `None` when it is over `limit` bytes or its column chunks'
    /// offsets are not a range inside the file (the file reader then reports what is wrong).
    fn read(file: &File, file_len: u64, meta: &ArrowReaderMetadata, group: usize, limit: u64) -> std::io::Result<Option<RowGroupBytes>> {
        let rg = meta.metadata().row_group(group);
        let (mut start, mut end) = (u64::MAX, 0u64);
        for c in rg.columns() {
            let first = c.dictionary_page_offset().unwrap_or(c.data_page_offset());
            let (Ok(first), Ok(len)) = (u64::try_from(first), u64::try_from(c.compressed_size())) else { return Ok(None) };
            start = start.min(first);
            end = end.max(first.saturating_add(len));
        }
        if start >= end || end > file_len || end - start > limit {
            return Ok(None);
        }
        let mut buf = vec![0u8; (end - start) as usize];
        file.read_exact_at(&mut buf, start)?;
        Ok(Some(RowGroupBytes { start, bytes: buf.into(), file_len }))
    }

    fn slice(&self, at: u64, len: Option<usize>) -> parquet::errors::Result<Bytes> {
        let from = at.checked_sub(self.start).map(|x| x as usize).filter(|&x| x <= self.bytes.len());
        let to = from.and_then(|f| len.map_or(Some(self.bytes.len()), |l| f.checked_add(l))).filter(|&t| t <= self.bytes.len());
        match (from, to) {
            (Some(f), Some(t)) => Ok(self.bytes.slice(f..t)),
            _ => Err(parquet::errors::ParquetError::EOF(format!(
                "bytes {at}..{} are outside the row group's column chunks ({}..{})",
                len.map_or("".into(), |l| at.saturating_add(l as u64).to_string()),
                self.start,
                self.start + self.bytes.len() as u64
            ))),
        }
    }
}

impl Length for RowGroupBytes {
    fn len(&self) -> u64 {
        self.file_len
    }
}

impl ChunkReader for RowGroupBytes {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        Ok(self.slice(start, None)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        self.slice(start, Some(length))
    }
}

/// A field with its byte and string columns (also inside structs and lists) as view types.
fn as_view(f: &FieldRef) -> FieldRef {
    let t = match f.data_type() {
        DataType::Binary | DataType::LargeBinary => DataType::BinaryView,
        DataType::Utf8 | DataType::LargeUtf8 => DataType::Utf8View,
        DataType::Struct(fields) => DataType::Struct(fields.iter().map(as_view).collect::<Vec<_>>().into()),
        DataType::List(item) => DataType::List(as_view(item)),
        DataType::LargeList(item) => DataType::LargeList(as_view(item)),
        _ => return f.clone(),
    };
    Arc::new(f.as_ref().clone().with_data_type(t))
}

/// Row `i` of a batch as a JSON object (column name → value) plus its blobs.
pub fn row_of(batch: &RecordBatch, i: usize) -> Row {
    let mut blobs = Vec::new();
    let mut o = Map::new();
    for (field, col) in batch.schema().fields().iter().zip(batch.columns()) {
        o.insert(field.name().clone(), value(col.as_ref(), i, &mut blobs));
    }
    Row { value: Value::Object(o), blobs }
}

fn blob(bytes: &[u8], blobs: &mut Vec<Vec<u8>>) -> Value {
    blobs.push(bytes.to_vec());
    blob_marker(blobs.len() - 1)
}

fn list(a: &dyn Array, blobs: &mut Vec<Vec<u8>>) -> Value {
    Value::Array((0..a.len()).map(|j| value(a, j, blobs)).collect())
}

fn float(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// Value `i` of an Arrow array as JSON; binary values go to `blobs`.
fn value(a: &dyn Array, i: usize, blobs: &mut Vec<Vec<u8>>) -> Value {
    if a.is_null(i) {
        return Value::Null;
    }
    macro_rules! prim {
        ($t:ty, $f:expr) => {
            $f(a.as_primitive::<$t>().value(i))
        };
    }
    match a.data_type() {
        DataType::Utf8 => Value::String(a.as_string::<i32>().value(i).to_string()),
        DataType::LargeUtf8 => Value::String(a.as_string::<i64>().value(i).to_string()),
        DataType::Utf8View => Value::String(a.as_string_view().value(i).to_string()),
        DataType::Binary => blob(a.as_binary::<i32>().value(i), blobs),
        DataType::LargeBinary => blob(a.as_binary::<i64>().value(i), blobs),
        DataType::BinaryView => blob(a.as_binary_view().value(i), blobs),
        DataType::FixedSizeBinary(_) => blob(a.as_fixed_size_binary().value(i), blobs),
        DataType::Boolean => Value::Bool(a.as_boolean().value(i)),
        DataType::Int8 => prim!(Int8Type, Value::from),
        DataType::Int16 => prim!(Int16Type, Value::from),
        DataType::Int32 => prim!(Int32Type, Value::from),
        DataType::Int64 => prim!(Int64Type, Value::from),
        DataType::UInt8 => prim!(UInt8Type, Value::from),
        DataType::UInt16 => prim!(UInt16Type, Value::from),
        DataType::UInt32 => prim!(UInt32Type, Value::from),
        DataType::UInt64 => prim!(UInt64Type, Value::from),
        DataType::Float16 => prim!(Float16Type, |x: <Float16Type as arrow_array::ArrowPrimitiveType>::Native| float(x.to_f64())),
        DataType::Float32 => prim!(Float32Type, |x: f32| float(x as f64)),
        DataType::Float64 => prim!(Float64Type, float),
        DataType::Struct(_) => {
            let s = a.as_struct();
            let mut o = Map::new();
            for (f, c) in s.fields().iter().zip(s.columns()) {
                o.insert(f.name().clone(), value(c.as_ref(), i, blobs));
            }
            Value::Object(o)
        }
        DataType::List(_) => list(a.as_list::<i32>().value(i).as_ref(), blobs),
        DataType::LargeList(_) => list(a.as_list::<i64>().value(i).as_ref(), blobs),
        DataType::FixedSizeList(..) => list(a.as_fixed_size_list().value(i).as_ref(), blobs),
        DataType::Map(..) => {
            let m = a.as_map();
            let entries = m.value(i);
            let (k, v) = (entries.column(0), entries.column(1));
            let keys: Vec<Value> = (0..k.len()).map(|j| value(k.as_ref(), j, blobs)).collect();
            if keys.iter().all(Value::is_string) {
                let mut o = Map::new();
                for (j, key) in keys.into_iter().enumerate() {
                    o.insert(key.as_str().unwrap().to_string(), value(v.as_ref(), j, blobs));
                }
                Value::Object(o)
            } else {
                Value::Array(keys.into_iter().enumerate().map(|(j, key)| Value::Array(vec![key, value(v.as_ref(), j, blobs)])).collect())
            }
        }
        DataType::Dictionary(..) => match a.as_any_dictionary_opt() {
            Some(d) => {
                let k = d.normalized_keys()[i];
                value(d.values().as_ref(), k, blobs)
            }
            None => Value::Null,
        },
        _ => Value::Null,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow_array::builder::{BinaryBuilder, ListBuilder, StringBuilder, StructBuilder};
    use arrow_array::{ArrayRef, Int64Array, StringArray};
    use arrow_schema::{Field, Fields, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;

    fn image_struct_fields() -> Fields {
        Fields::from(vec![Field::new("bytes", DataType::Binary, true), Field::new("path", DataType::Utf8, true)])
    }

    #[test]
    fn rows_with_embedded_images_and_positions() {
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join("x.parquet");
        let n = 70usize;
        let mut img = StructBuilder::from_fields(image_struct_fields(), n);
        let mut imgs = ListBuilder::new(StructBuilder::from_fields(image_struct_fields(), n));
        for r in 0..n {
            img.field_builder::<BinaryBuilder>(0).unwrap().append_value(format!("bytes{r}").as_bytes());
            img.field_builder::<StringBuilder>(1).unwrap().append_value(format!("{r}.jpg"));
            img.append(true);
            let l = imgs.values();
            for k in 0..2 {
                l.field_builder::<BinaryBuilder>(0).unwrap().append_null();
                l.field_builder::<StringBuilder>(1).unwrap().append_value(format!("p{r}-{k}.png"));
                l.append(true);
            }
            imgs.append(true);
        }
        let q: ArrayRef = Arc::new(StringArray::from_iter_values((0..n).map(|r| format!("q{r}"))));
        let id: ArrayRef = Arc::new(Int64Array::from_iter_values(0..n as i64));
        let img: ArrayRef = Arc::new(img.finish());
        let imgs: ArrayRef = Arc::new(imgs.finish());
        let schema = Arc::new(Schema::new(vec![
            Field::new("question", DataType::Utf8, false),
            Field::new("id", DataType::Int64, false),
            Field::new("image", img.data_type().clone(), true),
            Field::new("images", imgs.data_type().clone(), true),
        ]));
        let batch = RecordBatch::try_new(schema.clone(), vec![q, id, img, imgs]).unwrap();
        let props = WriterProperties::builder().set_max_row_group_row_count(Some(40)).build();
        let mut w = ArrowWriter::try_new(File::create(&path).unwrap(), schema, Some(props)).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();

        assert_eq!(super::super::sniff(&path).unwrap(), super::super::Kind::Parquet);
        let read = |whole_row_group| {
            let mut r = ParquetRows::open(&path, "x", 1 << 20).unwrap();
            r.whole_row_group = whole_row_group;
            let mut items = Vec::new();
            loop {
                let c = r.next_chunk(25).unwrap();
                if c.is_empty() {
                    break;
                }
                items.extend(c);
            }
            (items, r.bytes_read(), r.groups_read_whole)
        };
        // Row groups read whole (one pread each), and page by page from the file: the same rows.
        let (items, bytes, whole) = read(ROW_GROUP_BYTES);
        let (by_page, bytes_by_page, none) = read(0);
        assert_eq!((bytes, whole, none), (bytes_by_page, 2, 0));
        assert_eq!(format!("{:?}", items.iter().map(|i| (&i.src, &i.body)).collect::<Vec<_>>()), format!("{:?}", by_page.iter().map(|i| (&i.src, &i.body)).collect::<Vec<_>>()));
        assert_eq!(items.len(), n);
        let it = &items[45];
        assert_eq!((it.src.line, it.src.row_group, it.src.row), (46, Some(1), Some(5)));
        let Body::Row(row) = &it.body else { panic!() };
        assert_eq!(row.value["question"], "q45");
        assert_eq!(row.value["id"], 45);
        assert_eq!(row.blobs, vec![b"bytes45".to_vec()]);
        let refs = crate::row::image_refs(&row.value["image"]).unwrap();
        assert_eq!(refs, vec![crate::row::ImageSrc::Embedded { index: 0, name: Some("45.jpg".into()) }]);
        let refs = crate::row::image_refs(&row.value["images"]).unwrap();
        assert_eq!(refs, vec![crate::row::ImageSrc::Path("p45-0.png".into()), crate::row::ImageSrc::Path("p45-1.png".into())]);
        assert!(bytes > 0);
    }
}
