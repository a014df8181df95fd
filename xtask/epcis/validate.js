// Validates EPCIS 2.0 documents with GS1's epcis2.js SDK: every file named on the command line
// must pass; prints the errors of those that do not and exits 1.
const fs = require('fs');
const { validateEpcisDocument } = require('epcis2.js');

let refused = 0;
for (const file of process.argv.slice(2)) {
  const document = JSON.parse(fs.readFileSync(file, 'utf8'));
  const result = validateEpcisDocument(document, false);
  if (!result.success) {
    refused += 1;
    console.log(`${file}: ${JSON.stringify(result.errors)}`);
  }
}
console.log(`${process.argv.length - 2 - refused} valid, ${refused} invalid`);
process.exit(refused === 0 ? 0 : 1);
