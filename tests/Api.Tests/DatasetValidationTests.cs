using System.Net;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using System.Text.Json.Nodes;
using FineTune.Api.Tests;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Tests.Datasets;

/// <summary>The API with small dataset limits, 3 listed errors, and a speed for the cpu pool (for the estimate).</summary>
public sealed class LimitedApiFactory : ApiFactory
{
    protected override IEnumerable<(string Key, string Value)> Settings =>
    [
        ("Datasets:MaxBytes", "4000"), ("Datasets:MaxLineBytes", "300"), ("Datasets:MaxExamples", "40"), ("Datasets:MaxErrors", "3"),
        ("Estimates:TokensPerSecond:cpu", "1000"),
    ];
}

/// <summary>Submit-time dataset validation: every error names its field (and its lines), nothing is queued; a valid
/// dataset's counts, checksum and the estimate are on the job.</summary>
public sealed class DatasetValidationTests(LimitedApiFactory api) : IClassFixture<LimitedApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    private string Dataset(string content, string? name = null)
    {
        name ??= $"d-{Guid.NewGuid():N}.jsonl";
        File.WriteAllText(Path.Combine(api.DataRoot, name), content);
        return name;
    }

    private static string Job(string trainingData, Action<JsonObject>? hyper = null, string? validationData = null)
    {
        return Requests.LoraWith(o =>
        {
            o["trainingData"] = trainingData;
            if (validationData is not null) o["validationData"] = validationData;
            hyper?.Invoke(o["hyperparameters"]!.AsObject());
        });
    }

    /// <summary>Submits and expects a 422: the field's messages, and the line numbers of its datasetErrors.</summary>
    private async Task<(string[] Messages, int[] Lines, int Total)> Refused(string body, string field)
    {
        var client = await api.ClientAsync("datasets-bad");
        var before = api.Dispatcher.Enqueued.Count;
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(body), Ct);
        var text = await response.Content.ReadAsStringAsync(Ct);
        Assert.True(response.StatusCode == HttpStatusCode.UnprocessableEntity, text);
        Assert.Equal("application/problem+json", response.Content.Headers.ContentType?.MediaType);
        var problem = JsonDocument.Parse(text).RootElement;
        Assert.True(problem.GetProperty("errors").TryGetProperty(field, out var list), $"no error for {field}: {text}");
        var lines = Array.Empty<int>();
        var total = 0;
        if (problem.TryGetProperty("datasetErrors", out var de) && de.TryGetProperty(field, out var f))
        {
            lines = [.. f.GetProperty("errors").EnumerateArray().Select(e => e.GetProperty("line").GetInt32())];
            total = f.GetProperty("total").GetInt32();
        }
        Assert.Equal(before, api.Dispatcher.Enqueued.Count);
        await using var db = api.Db();
        var tenant = await api.TenantIdAsync("datasets-bad");
        Assert.False(await db.Jobs.AnyAsync(j => j.TenantId == tenant, Ct));
        return ([.. list.EnumerateArray().Select(e => e.GetString()!)], lines, total);
    }

    [Fact]
    public async Task Malformed_lines_are_listed_with_their_line_numbers()
    {
        var data = Dataset("""
            {"prompt": "a", "completion": "b"}
            {"prompt": "a", "completion":
            {"prompt": "a", "completion": "b"}
            [1, 2]
            {"prompt": "a", "completion": 5}
            {"prompt": "", "completion": "b"}
            """);
        var (messages, lines, total) = await Refused(Job(data), "trainingData");
        Assert.Equal([2, 4, 5], lines);
        Assert.Equal(4, total);
        Assert.StartsWith("line 2: invalid JSON", messages[0]);
        Assert.Equal("line 4: expected a JSON object, got an array", messages[1]);
        Assert.Equal("line 5: \"completion\" must be a string, got a number", messages[2]);
        Assert.Equal("4 problems in total; the first 3 are listed (Datasets:MaxErrors)", messages[3]);
    }

    [Fact]
    public async Task Unrecognised_and_empty_lines_are_errors_and_an_empty_file_has_no_examples()
    {
        var (messages, lines, _) = await Refused(Job(Dataset("{\"question\": \"q\"}\n{\"text\": \"\"}\n")), "trainingData");
        Assert.Equal([1, 2], lines);
        Assert.Contains("unrecognised format", messages[0]);
        Assert.Equal("line 2: \"text\" is an empty string", messages[1]);

        var empty = await Refused(Job(Dataset("\n\n")), "trainingData");
        Assert.Equal(["the dataset contains no examples"], empty.Messages);
    }

    [Fact]
    public async Task Examples_longer_than_maxSeqLength_are_rejected_by_line_when_asked()
    {
        var data = Dataset($$"""
            {"prompt": "2+2=", "completion": "4"}
            {"prompt": "{{new string('x', 40)}}", "completion": "y"}
            {"prompt": "1+1=", "completion": "2"}
            {"prompt": "{{new string('z', 20)}}", "completion": "w"}
            """);
        var (messages, lines, total) = await Refused(Job(data, h => { h["maxSeqLength"] = 16; h["truncation"] = "reject"; }), "trainingData");
        Assert.Equal([2, 4], lines);
        Assert.Equal(2, total);
        Assert.Equal("line 2: the example has 43 tokens, more than maxSeqLength=16 (hyperparameters.truncation is \"reject\")", messages[0]);
    }

    [Fact]
    public async Task Truncated_examples_are_counted_and_the_job_shows_dataset_counts_checksum_and_estimate()
    {
        var content = $$"""
            {"prompt": "2+2=", "completion": "4"}
            {"prompt": "ab", "completion": "{{new string('c', 30)}}"}
            {"prompt": "{{new string('p', 30)}}", "completion": "q"}
            """;
        var data = Dataset(content);
        var validation = Dataset("{\"text\": \"hello\"}\n");
        var client = await api.ClientAsync("datasets-ok");
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(Job(data, h =>
        {
            h["maxSeqLength"] = 16; h["epochs"] = 3; h["batchSize"] = 2;
        }, validation)), Ct);
        Assert.True(response.StatusCode == HttpStatusCode.Accepted, await response.Content.ReadAsStringAsync(Ct));
        var id = (await response.JsonAsync()).GetProperty("id").GetGuid();

        var job = await (await client.GetAsync($"/v1/fine-tunes/{id}", Ct)).JsonAsync();
        var dataset = job.GetProperty("dataset");
        // Byte-level tokens + BOS + EOS: 7, then 34 cut to 16; the third is cut before its completion (nothing to learn).
        Assert.Equal(2, dataset.GetProperty("examples").GetInt32());
        Assert.Equal(7 + 16, dataset.GetProperty("tokens").GetInt64());
        Assert.Equal(2, dataset.GetProperty("truncated").GetInt32());
        Assert.Equal(1, dataset.GetProperty("skipped").GetInt32());
        Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(content))), dataset.GetProperty("sha256").GetString());
        var v = job.GetProperty("validationDataset");
        Assert.Equal(1, v.GetProperty("examples").GetInt32());
        Assert.Equal(7, v.GetProperty("tokens").GetInt64());
        // 3 epochs × 2 examples / batch 2 = 3 steps of 2 rows, 23/2 tokens a row: 69 tokens; at 1000 tokens/s.
        var estimate = job.GetProperty("estimate");
        Assert.Equal(69, estimate.GetProperty("tokens").GetInt64());
        Assert.Equal(0.1, estimate.GetProperty("seconds").GetDouble());
        Assert.Equal("truncate", job.GetProperty("hyperparameters").GetProperty("truncation").GetString());

        await using var db = api.Db();
        var row = await db.Jobs.SingleAsync(j => j.Id == id, Ct);
        Assert.Equal(dataset.GetProperty("sha256").GetString(), row.DatasetSha256);
        Assert.Equal(23, row.DatasetTokens);
    }

    [Fact]
    public async Task Limits_on_bytes_line_length_and_examples_are_named()
    {
        var big = Dataset(string.Concat(Enumerable.Repeat("{\"prompt\": \"p\", \"completion\": \"" + new string('c', 200) + "\"}\n", 20)));
        Assert.Contains("over the limit of 4000 bytes (Datasets:MaxBytes)", (await Refused(Job(big), "trainingData")).Messages[0]);

        var longLine = Dataset("{\"text\": \"a\"}\n{\"text\": \"" + new string('b', 400) + "\"}\n");
        var (messages, lines, _) = await Refused(Job(longLine), "trainingData");
        Assert.Equal([2], lines);
        Assert.Equal("line 2: line is longer than 300 bytes (Datasets:MaxLineBytes)", messages[0]);

        var many = Dataset(string.Concat(Enumerable.Range(0, 45).Select(i => $"{{\"text\": \"{i}\"}}\n")));
        var tooMany = await Refused(Job(many), "trainingData");
        Assert.Equal([41], tooMany.Lines);
        Assert.Contains("more than 40 examples (Datasets:MaxExamples)", tooMany.Messages[0]);
    }

    [Fact]
    public async Task A_token_outside_the_models_vocabulary_is_an_error_of_its_line()
    {
        var dir = Path.Combine(api.ModelsRoot, "small-vocab");
        ApiFactory.WriteTinyModel(dir);
        var config = JsonNode.Parse(File.ReadAllText(Path.Combine(dir, "config.json")))!;
        config["vocab_size"] = 100; // the tiny tokenizer's byte ids go up to 255
        File.WriteAllText(Path.Combine(dir, "config.json"), config.ToJsonString());
        var data = Dataset("{\"text\": \"ABC\"}\n{\"text\": \"xyz\"}\n");
        var (messages, lines, _) = await Refused(Requests.LoraWith(o => { o["model"] = "small-vocab"; o["trainingData"] = data; }), "trainingData");
        Assert.Equal([1, 2], lines);
        Assert.StartsWith("line 1: token id 256 is outside the model's vocabulary (100)", messages[0]); // its BOS
    }

    [Fact]
    public async Task Hyperparameters_of_the_data_options_are_range_checked()
    {
        var data = Dataset("{\"text\": \"a\"}\n{\"text\": \"b\"}\n");
        Assert.Contains("truncate, reject", (await Refused(Job(data, h => h["truncation"] = "drop"), "hyperparameters.truncation")).Messages[0]);
        Assert.Contains("between 0 and 0.5", (await Refused(Job(data, h => h["validationSplit"] = 0.9), "hyperparameters.validationSplit")).Messages[0]);
        Assert.Contains("between 1 and", (await Refused(Job(data, h => h["evalEvery"] = 0), "hyperparameters.evalEvery")).Messages[0]);
        Assert.Contains("needs at least 2 training examples",
            (await Refused(Job(Dataset("{\"text\": \"only one\"}\n"), h => h["validationSplit"] = 0.2), "hyperparameters.validationSplit")).Messages[0]);
        Assert.Contains("must be 0 when validationData is given",
            (await Refused(Job(data, h => h["validationSplit"] = 0.2, validationData: data), "hyperparameters.validationSplit")).Messages[0]);
    }

    [Fact]
    public async Task A_model_folder_without_a_tokenizer_is_refused_on_model()
    {
        var dir = Path.Combine(api.ModelsRoot, "no-tokenizer");
        ApiFactory.WriteTinyModel(dir);
        File.Delete(Path.Combine(dir, "tokenizer.json"));
        var (messages, _, _) = await Refused(Requests.LoraWith(o => o["model"] = "no-tokenizer"), "model");
        Assert.Contains("the tokenizer of 'no-tokenizer' cannot be used: no tokenizer in no-tokenizer: neither tokenizer.json", messages[0]);
        Assert.DoesNotContain(api.ModelsRoot, messages[0]);
    }
}
